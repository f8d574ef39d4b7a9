//! Gateway API `Duration` strings: one to four `<number><unit>` pairs, units `h`, `m`, `s`,
//! `ms` (`"1h30m"`, `"250ms"`, `"10s"`).

use std::time::Duration as StdDuration;

/// A duration in the Gateway API string form, kept as written so objects round-trip.
pub type Duration = String;

/// Parses a Gateway API duration. Errors say what is wrong with the text.
pub fn parse_duration(text: &str) -> Result<StdDuration, String> {
    if text.is_empty() {
        return Err("empty duration (expected e.g. \"250ms\", \"10s\", \"1h30m\")".into());
    }
    let mut total = StdDuration::ZERO;
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(format!(
                "invalid duration {text:?}: expected 1 to 5 digits followed by h, m, s or ms"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {text:?}"))?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (StdDuration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (StdDuration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (StdDuration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (StdDuration::from_secs(1), 1)
        } else {
            return Err(format!(
                "invalid duration {text:?}: unit must be h, m, s or ms"
            ));
        };
        rest = &rest[len..];
        total += unit * u32::try_from(value).map_err(|_| format!("invalid duration {text:?}"))?;
        parts += 1;
        if parts > 4 {
            return Err(format!("invalid duration {text:?}: at most 4 parts"));
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_durations() {
        assert_eq!(parse_duration("250ms"), Ok(StdDuration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(StdDuration::from_secs(5400)));
        assert_eq!(parse_duration("10s"), Ok(StdDuration::from_secs(10)));
        assert_eq!(
            parse_duration("1m1s1ms"),
            Ok(StdDuration::from_millis(61_001))
        );
    }

    #[test]
    fn rejects_bad_durations_with_reason() {
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").unwrap_err().contains("unit"));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("123456s").is_err());
        assert!(
            parse_duration("1s1s1s1s1s")
                .unwrap_err()
                .contains("4 parts")
        );
    }
}
