//! Human-readable formatting shared by the commands.

use std::io::{IsTerminal as _, Write as _};

/// Bytes in binary units with one decimal: `98.4 MiB`. Used by `inspect`, whose numbers are
/// compared with tensor sizes that are powers of two.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    scaled(n, 1024.0, &UNITS)
}

/// Bytes in decimal units with one decimal: `104.2 MB`. Used by the daemon commands, whose
/// tables read like `ollama ps`.
pub fn bytes_decimal(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    scaled(n, 1000.0, &UNITS)
}

fn scaled(n: u64, step: f64, units: &[&str]) -> String {
    let mut value = n as f64;
    let mut unit = 0;
    while value >= step && unit + 1 < units.len() {
        value /= step;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} {}", units[0])
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// A throughput: whole numbers from 100 up (the decimals are noise there), one decimal below.
pub fn rate(per_second: f64) -> String {
    if per_second >= 100.0 {
        format!("{per_second:.0}")
    } else {
        format!("{per_second:.1}")
    }
}

/// A length of time in words, rounded down: `4 minutes`, `about an hour`, `3 days`.
pub fn span_words(ms: i64) -> String {
    let seconds = ms.max(0) / 1000;
    let plural = |n: i64, unit: &str| {
        if n == 1 {
            format!("1 {unit}")
        } else {
            format!("{n} {unit}s")
        }
    };
    match seconds {
        0 => "less than a second".to_owned(),
        1..=59 => plural(seconds, "second"),
        60..=119 => "about a minute".to_owned(),
        120..=3599 => plural(seconds / 60, "minute"),
        3600..=7199 => "about an hour".to_owned(),
        7200..=86_399 => plural(seconds / 3600, "hour"),
        _ => plural(seconds / 86_400, "day"),
    }
}

/// When something happens relative to `now_ms` (both Unix milliseconds):
/// `4 minutes from now`, or `now` once the moment has passed.
pub fn until(at_ms: i64, now_ms: i64) -> String {
    if at_ms <= now_ms {
        "now".to_owned()
    } else {
        format!("{} from now", span_words(at_ms - now_ms))
    }
}

/// A compact elapsed time for uptimes: `42s`, `3m 12s`, `2h 05m`, `4d 03h`.
pub fn uptime(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A token's text as a table shows it: quoted, with whitespace and control characters
/// escaped so that a newline token does not break the row.
pub fn token_text(piece: &str) -> String {
    let mut out = String::with_capacity(piece.len() + 2);
    out.push('"');
    for c in piece.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// How a table column lines up its cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A plain-text table: one header row, columns three spaces apart, no trailing spaces.
/// With `bold`, the header row is wrapped in ANSI bold (see [`use_color`]).
pub fn table(headers: &[(&str, Align)], rows: &[Vec<String>], bold: bool) -> String {
    let width = |cell: &str| cell.chars().count();
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| width(h)).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let pad = widths[i].saturating_sub(width(cell));
            let last = i + 1 == headers.len();
            if i > 0 {
                text.push_str("   ");
            }
            match headers[i].1 {
                Align::Right => {
                    text.push_str(&" ".repeat(pad));
                    text.push_str(cell);
                }
                Align::Left => {
                    text.push_str(cell);
                    if !last {
                        text.push_str(&" ".repeat(pad));
                    }
                }
            }
        }
        text
    };
    let mut out = String::new();
    let header = line(&mut headers.iter().map(|(h, _)| *h));
    if bold {
        out.push_str(&format!("\x1b[1m{header}\x1b[0m\n"));
    } else {
        out.push_str(&header);
        out.push('\n');
    }
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
        out.push('\n');
    }
    out
}

/// Whether to print bold headers: only to a terminal, and never when `NO_COLOR` is set
/// (<https://no-color.org>: any non-empty value).
pub fn use_color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes `text` to stdout and flushes it, so streamed text shows as it arrives. Returns
/// false when stdout is a closed pipe (`egpuctl generate … | head -c 100`): the caller
/// stops producing output, and this is not an error.
pub fn write_stdout(text: &str) -> std::io::Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `text` to stdout. A closed pipe (`egpuctl inspect … | head`) is not an error.
pub fn emit(text: &str) -> std::io::Result<()> {
    write_stdout(text).map(|_| ())
}

/// Prints a value as pretty JSON followed by a newline.
pub fn emit_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    emit(&(serde_json::to_string_pretty(value)? + "\n"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_scale() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(98_362_432), "93.8 MiB");
    }

    #[test]
    fn bytes_decimal_scale() {
        assert_eq!(bytes_decimal(0), "0 B");
        assert_eq!(bytes_decimal(999), "999 B");
        assert_eq!(bytes_decimal(1000), "1.0 kB");
        assert_eq!(bytes_decimal(104_200_000), "104.2 MB");
        assert_eq!(bytes_decimal(8_000_000_000), "8.0 GB");
        assert_eq!(bytes_decimal(u64::MAX), "18446744.1 TB");
    }

    #[test]
    fn rates_keep_meaningful_digits() {
        assert_eq!(rate(850.4), "850");
        assert_eq!(rate(95.34), "95.3");
        assert_eq!(rate(0.0), "0.0");
    }

    #[test]
    fn spans_in_words() {
        assert_eq!(span_words(-5), "less than a second");
        assert_eq!(span_words(999), "less than a second");
        assert_eq!(span_words(1000), "1 second");
        assert_eq!(span_words(59_999), "59 seconds");
        assert_eq!(span_words(60_000), "about a minute");
        assert_eq!(span_words(4 * 60_000 + 30_000), "4 minutes");
        assert_eq!(span_words(3_600_000), "about an hour");
        assert_eq!(span_words(5 * 3_600_000), "5 hours");
        assert_eq!(span_words(86_400_000), "1 day");
        assert_eq!(until(1_000, 2_000), "now");
        assert_eq!(until(241_000, 1_000), "4 minutes from now");
    }

    #[test]
    fn uptimes_are_compact() {
        assert_eq!(uptime(42.9), "42s");
        assert_eq!(uptime(192.0), "3m 12s");
        assert_eq!(uptime(7500.0), "2h 05m");
        assert_eq!(uptime(4.0 * 86_400.0 + 3.0 * 3600.0), "4d 03h");
        assert_eq!(uptime(-1.0), "0s");
    }

    #[test]
    fn token_text_escapes_what_breaks_a_row() {
        assert_eq!(token_text(" the"), "\" the\"");
        assert_eq!(token_text("\n\t\"\\"), r#""\n\t\"\\""#);
        assert_eq!(token_text("\u{1}"), "\"\\u{1}\"");
    }

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let text = table(
            &[
                ("NAME", Align::Left),
                ("SIZE", Align::Right),
                ("PATH", Align::Left),
            ],
            &[
                vec!["a".into(), "1.0 kB".into(), "/x".into()],
                vec!["longer".into(), "5 B".into(), "/y/z".into()],
            ],
            false,
        );
        assert_eq!(
            text,
            "NAME       SIZE   PATH\n\
             a        1.0 kB   /x\n\
             longer      5 B   /y/z\n"
        );
        let bold = table(&[("A", Align::Left)], &[], true);
        assert_eq!(bold, "\x1b[1mA\x1b[0m\n");
    }
}
