//! Small pieces every layer may use: text escaping, units, time as text, `text_enum!`.

pub mod text;
pub mod text_enum;
pub mod time;
pub mod units;

pub(crate) use text_enum::text_enum;

/// Whether the `n`th occurrence (counting from 0) of a repeated failure is logged: the first,
/// then at powers of two, so a flood costs a few log lines and the count says the rest.
pub fn log_at_powers_of_two(n: u64) -> bool {
    n == 0 || n.is_power_of_two()
}
