//! `--keep-alive` values: how long an idle model stays resident.

/// Parses a keep-alive duration into milliseconds as `LoadRequest.keep_alive_ms` takes it.
///
/// Accepted: `0` (unload as soon as idle), `-1`, any negative number, `forever` or `inf`
/// (never expire: -1), a bare number of seconds (`300`, as ollama's `keep_alive` reads it),
/// or one or more `NUMBER UNIT` parts with units `ms`, `s`, `m`, `h`, `d`: `30s`, `10m`,
/// `1.5h`, `1h30m`.
pub fn parse_keep_alive(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    if matches!(
        text.to_ascii_lowercase().as_str(),
        "forever" | "inf" | "never"
    ) {
        return Ok(-1);
    }
    if let Some(rest) = text.strip_prefix('-') {
        // Any negative amount means "forever"; it must still be a number, so a typo such as
        // `--keep-alive -x` is reported rather than pinning the model for good.
        parse_positive_ms(rest)?;
        return Ok(-1);
    }
    parse_positive_ms(text)
}

fn parse_positive_ms(text: &str) -> Result<i64, String> {
    let invalid =
        || format!("invalid duration {text:?}: use e.g. 30s, 10m, 2h, 1h30m, 0 or forever");
    if text.is_empty() {
        return Err(invalid());
    }
    // A bare number counts seconds.
    if let Ok(seconds) = text.parse::<f64>() {
        return to_ms(seconds, 1000.0).ok_or_else(invalid);
    }
    let mut total: i64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (number, after) = rest.split_at(number_len);
        let value: f64 = number.parse().map_err(|_| invalid())?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_ms = match unit {
            "ms" => 1.0,
            "s" | "sec" => 1000.0,
            "m" | "min" => 60_000.0,
            "h" => 3_600_000.0,
            "d" => 86_400_000.0,
            _ => return Err(invalid()),
        };
        let part = to_ms(value, unit_ms).ok_or_else(invalid)?;
        total = total.checked_add(part).ok_or_else(invalid)?;
        rest = next;
    }
    Ok(total)
}

fn to_ms(value: f64, unit_ms: f64) -> Option<i64> {
    let ms = (value * unit_ms).round();
    (ms.is_finite() && ms >= 0.0 && ms < i64::MAX as f64).then_some(ms as i64)
}

#[cfg(test)]
mod tests {
    use super::parse_keep_alive;

    #[test]
    fn units() {
        assert_eq!(parse_keep_alive("30s"), Ok(30_000));
        assert_eq!(parse_keep_alive("10m"), Ok(600_000));
        assert_eq!(parse_keep_alive("2h"), Ok(7_200_000));
        assert_eq!(parse_keep_alive("1d"), Ok(86_400_000));
        assert_eq!(parse_keep_alive("250ms"), Ok(250));
        assert_eq!(parse_keep_alive("1.5h"), Ok(5_400_000));
        assert_eq!(parse_keep_alive("1h30m"), Ok(5_400_000));
        assert_eq!(parse_keep_alive(" 5min "), Ok(300_000));
    }

    #[test]
    fn zero_and_bare_seconds() {
        assert_eq!(parse_keep_alive("0"), Ok(0));
        assert_eq!(parse_keep_alive("0s"), Ok(0));
        assert_eq!(parse_keep_alive("300"), Ok(300_000));
    }

    #[test]
    fn forever() {
        assert_eq!(parse_keep_alive("-1"), Ok(-1));
        assert_eq!(parse_keep_alive("-5m"), Ok(-1));
        assert_eq!(parse_keep_alive("forever"), Ok(-1));
        assert_eq!(parse_keep_alive("Forever"), Ok(-1));
        assert_eq!(parse_keep_alive("inf"), Ok(-1));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "", "m", "10x", "10 m", "-", "-x", "1..5s", "s10", "1e400", "9e18h",
        ] {
            assert!(parse_keep_alive(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
