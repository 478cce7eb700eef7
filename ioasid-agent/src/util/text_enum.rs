//! `text_enum!`: a closed set of words, one list for its serde form, its metric label and its
//! Display.

/// An enumeration written in audit records (serde) and used as a metric label or log field
/// (`label()`), from one list.
macro_rules! text_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $var:ident => $label:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $label)] $var,)+
        }
        impl $name {
            #[allow(dead_code, reason = "not every enumeration is listed outside the tests")]
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            pub const fn label(self) -> &'static str {
                match self { $($name::$var => $label,)+ }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.label())
            }
        }
    };
}

pub(crate) use text_enum;
