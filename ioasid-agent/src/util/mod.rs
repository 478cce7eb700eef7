//! Small pieces every layer may use: text escaping, units, time as text, `text_enum!`.

pub mod text;
pub mod text_enum;
pub mod time;
pub mod units;

pub(crate) use text_enum::text_enum;
