//! Units in flags and policy files.

use std::time::Duration;

/// A duration flag or field that is not one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitError {
    #[error("{0:?} is not a duration (e.g. 250ms, 5s, 2m)")]
    NotANumber(String),
    #[error("{text:?}: unknown unit {unit:?} (ms, s, m, h)")]
    Unit { text: String, unit: String },
    #[error("{0:?} must be positive")]
    NotPositive(String),
    #[error("{text:?} is out of range: between {min:?} and {max:?}")]
    Range { text: String, min: Duration, max: Duration },
}

/// `250ms`, `5s`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| UnitError::NotANumber(s.to_string()))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(UnitError::Unit { text: s.to_string(), unit: unit.to_string() }),
    };
    if !(secs > 0.0 && secs < 1e9) {
        return Err(UnitError::NotPositive(s.to_string()));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration flag's parser that also bounds it (checked before anything is attached).
fn bounded(s: &str, min: Duration, max: Duration) -> Result<Duration, UnitError> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(UnitError::Range { text: s.to_string(), min, max });
    }
    Ok(d)
}

/// `--sweep-interval`: 10 ms (the sweep reads every kernel map) to 10 s (storms are detected
/// within a sweep).
pub fn sweep_interval(s: &str) -> Result<Duration, UnitError> {
    bounded(s, Duration::from_millis(10), Duration::from_secs(10))
}

/// `--vm-retention`: 1 s to 7 days.
pub fn retention(s: &str) -> Result<Duration, UnitError> {
    bounded(s, Duration::from_secs(1), Duration::from_secs(7 * 86_400))
}

/// `policy learn --follow`: 1 s to 30 days.
pub fn follow_duration(s: &str) -> Result<Duration, UnitError> {
    bounded(s, Duration::from_secs(1), Duration::from_secs(30 * 86_400))
}

/// `top --interval`: 100 ms to 1 h.
pub fn refresh_interval(s: &str) -> Result<Duration, UnitError> {
    bounded(s, Duration::from_millis(100), Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_bounded() {
        assert!(sweep_interval("1e-10").is_err(), "not a panic: an error");
        assert!(sweep_interval("0.000001").is_err(), "a microsecond sweep would burn a core");
        assert_eq!(sweep_interval("100ms"), Ok(Duration::from_millis(100)));
        assert!(sweep_interval("1h").is_err());
        assert!(retention("10ms").is_err());
        assert!(refresh_interval("1ms").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["", "ms", "5x", "-1s", "0", "1e99", "nan"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
