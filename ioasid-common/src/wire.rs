//! `wire_enum!`: a `#[repr(u32)]` enum for a value that travels as `u32`, with `TryFrom<u32>`,
//! a stable text label and the list of every value, from one definition.

/// A `u32` from the other side that names no value of the enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: u32,
}

impl core::fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "unknown {} value {}", self.what, self.value)
    }
}

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $var:ident = $val:literal => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
        pub enum $name {
            $( $(#[$vmeta])* #[cfg_attr(feature = "user", serde(rename = $label))] $var = $val, )+
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.label())
            }
        }

        impl $name {
            /// Every value, in definition order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// The stable text form (metric label, audit field, log).
            pub const fn label(self) -> &'static str {
                match self {
                    $( $name::$var => $label, )+
                }
            }

            /// The value on the wire.
            #[inline(always)]
            pub const fn wire(self) -> u32 {
                self as u32
            }
        }

        impl TryFrom<u32> for $name {
            type Error = $crate::wire::UnknownValue;

            #[inline(always)]
            fn try_from(v: u32) -> Result<Self, Self::Error> {
                match v {
                    $( $val => Ok($name::$var), )+
                    value => Err($crate::wire::UnknownValue { what: stringify!($name), value }),
                }
            }
        }
    };
}
