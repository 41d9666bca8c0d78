//! The pieces of Python behaviour that chat templates observe through Jinja and that minijinja
//! does differently: `json.dumps` (which transformers installs as `tojson`), float `repr`,
//! `str.strip`/`str.split` whitespace, and how `None`/`True`/`False` print.
//!
//! Everything here exists so that a template renders the same bytes as under transformers.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Output, State, Value};

/// Whether Python's `str.isspace()` holds for `c`, which is what `str.strip()` and `str.split()`
/// without arguments use. It is Unicode `White_Space` (Rust's [`char::is_whitespace`]) plus the
/// four ASCII information separators U+001C..U+001F.
pub(crate) fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split(None, maxsplit)`: runs of whitespace separate words and empty words are
/// dropped. With a non-negative `maxsplit`, the remainder after that many splits is kept whole
/// (its leading whitespace removed, its trailing whitespace kept), as Python does.
pub(crate) fn split_whitespace(s: &str, maxsplit: Option<i64>) -> Vec<&str> {
    let mut words = Vec::new();
    let mut rest = s.trim_start_matches(is_python_whitespace);
    while !rest.is_empty() {
        if let Some(max) = maxsplit {
            if max >= 0 && words.len() as i64 >= max {
                words.push(rest);
                break;
            }
        }
        match rest.find(is_python_whitespace) {
            Some(end) => {
                words.push(&rest[..end]);
                rest = rest[end..].trim_start_matches(is_python_whitespace);
            }
            None => {
                words.push(rest);
                break;
            }
        }
    }
    words
}

/// Which ends of a string [`strip`] removes characters from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StripSide {
    Both,
    Start,
    End,
}

/// Python's `str.strip(chars)` family: without `chars`, strips Python whitespace; with `chars`,
/// strips any of its characters.
pub(crate) fn strip<'a>(s: &'a str, chars: Option<&str>, side: StripSide) -> &'a str {
    let strip_char = |c: char| match chars {
        Some(chars) => chars.contains(c),
        None => is_python_whitespace(c),
    };
    match side {
        StripSide::Both => s.trim_matches(strip_char),
        StripSide::Start => s.trim_start_matches(strip_char),
        StripSide::End => s.trim_end_matches(strip_char),
    }
}

/// Python's `repr(float)` (and so `str(float)`): the shortest digits that round-trip, written in
/// positional notation when the decimal exponent is in -4..16 and in scientific notation
/// (`1e+16`, `1.5e-05`) otherwise; integral values keep a `.0`.
pub(crate) fn float_repr(value: f64) -> String {
    if value.is_nan() {
        return "nan".to_owned();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    if value == 0.0 {
        return if value.is_sign_negative() {
            "-0.0"
        } else {
            "0.0"
        }
        .to_owned();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits Python uses, as `d.ddde[-]x`.
    let scientific = format!("{value:e}");
    let Some((mantissa, exponent)) = scientific.split_once('e') else {
        return value.to_string();
    };
    let Ok(exponent) = exponent.parse::<i32>() else {
        return value.to_string();
    };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(unsigned) => ("-", unsigned),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();

    let mut out = String::from(sign);
    if (-4..16).contains(&exponent) {
        if exponent >= 0 {
            let int_len = exponent as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exponent - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(out, "e{exponent_sign}{:02}", exponent.unsigned_abs());
    }
    out
}

/// A number as Python's `str()` writes it.
fn number_str(value: &Value) -> String {
    if value.is_integer() {
        value.to_string()
    } else {
        match f64::try_from(value.clone()) {
            Ok(float) => float_repr(float),
            Err(_) => value.to_string(),
        }
    }
}

/// What Python's `str()` gives for a template value, as far as it differs from minijinja's
/// display: `None`, `True`, `False` and floats. Containers keep minijinja's formatting.
pub(crate) fn python_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::None => "None".to_owned(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_owned(),
        ValueKind::Number => number_str(value),
        _ => value.to_string(),
    }
}

/// The output formatter: prints `{{ none }}`, `{{ true }}` and floats as Jinja under Python
/// does, and leaves every other value to minijinja.
pub(crate) fn format_output(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool => out.write_str(&python_str(value))?,
        ValueKind::Number if !value.is_integer() => out.write_str(&number_str(value))?,
        _ => minijinja::escape_formatter(out, state, value)?,
    }
    Ok(())
}

/// Options of Python's `json.dumps` that transformers' `tojson` passes through.
#[derive(Debug)]
struct JsonOptions {
    ensure_ascii: bool,
    /// The text one level of indentation adds; `None` writes everything on one line.
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, taking those options positionally in that order or by
/// keyword. Unlike Jinja's own `tojson` it escapes no HTML characters, keeps non-ASCII text as
/// it is, and separates items with `", "` and keys with `": "`.
pub(crate) fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    separators: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let pick = |positional: Option<Value>, name: &str| -> Result<Option<Value>, Error> {
        let keyword: Option<Value> = kwargs.get(name)?;
        match (positional, keyword) {
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::TooManyArguments,
                format!("tojson got multiple values for argument '{name}'"),
            )),
            (positional, keyword) => Ok(positional.or(keyword).filter(|v| !v.is_none())),
        }
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = pick(indent, "indent")?;
    let separators = pick(separators, "separators")?;
    let sort_keys = pick(None, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_owned()),
        // Python's json repeats a space `indent` times; bools are ints there.
        Some(v) if v.kind() == ValueKind::Bool => {
            Some(if v.is_true() { " " } else { "" }.to_owned())
        }
        Some(v) => match v.as_i64() {
            Some(n) => {
                let width = usize::try_from(n.max(0)).unwrap_or(usize::MAX);
                super::check_width("tojson indent", width)?;
                Some(" ".repeat(width))
            }
            None => {
                return Err(invalid(format!(
                    "tojson indent must be an int or a string, not {v}"
                )))
            }
        },
    };
    let (item_separator, key_separator) = match separators {
        Some(pair) => {
            let parts: Vec<Value> = pair.try_iter()?.collect();
            match parts.as_slice() {
                [item, key] if item.as_str().is_some() && key.as_str().is_some() => (
                    item.as_str().unwrap_or_default().to_owned(),
                    key.as_str().unwrap_or_default().to_owned(),
                ),
                _ => return Err(invalid("tojson separators must be two strings")),
            }
        }
        // json.dumps drops the space after commas when indenting, since lines end there.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let options = JsonOptions {
        ensure_ascii,
        indent,
        item_separator,
        key_separator,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, value, &options, 0)?;
    Ok(Value::from(out))
}

fn write_newline_indent(out: &mut String, options: &JsonOptions, depth: usize) {
    if let Some(indent) = &options.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
}

fn write_json(
    out: &mut String,
    value: &Value,
    options: &JsonOptions,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let float = f64::try_from(value.clone())?;
                out.push_str(&match float {
                    f if f.is_nan() => "NaN".to_owned(),
                    f if f == f64::INFINITY => "Infinity".to_owned(),
                    f if f == f64::NEG_INFINITY => "-Infinity".to_owned(),
                    f => float_repr(f),
                });
            }
        }
        ValueKind::String => write_json_string(
            out,
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_separator);
                }
                write_newline_indent(out, options, depth + 1);
                write_json(out, item, options, depth + 1)?;
            }
            write_newline_indent(out, options, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if options.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&options.item_separator);
                }
                write_newline_indent(out, options, depth + 1);
                write_json_key(out, key, options)?;
                out.push_str(&options.key_separator);
                write_json(out, &value.get_item(key)?, options, depth + 1)?;
            }
            write_newline_indent(out, options, depth);
            out.push('}');
        }
        ValueKind::Undefined => {
            return Err(invalid("Object of type Undefined is not JSON serializable"))
        }
        kind => {
            return Err(invalid(format!(
                "Object of type {kind} is not JSON serializable"
            )))
        }
    }
    Ok(())
}

/// A JSON object key: Python's json turns int, float, bool and None keys into strings.
fn write_json_key(out: &mut String, key: &Value, options: &JsonOptions) -> Result<(), Error> {
    let text = match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_owned(),
        ValueKind::Number => number_str(key),
        kind => {
            return Err(invalid(format!(
                "keys must be str, int, float, bool or None, not {kind}"
            )))
        }
    };
    write_json_string(out, &text, options.ensure_ascii);
    Ok(())
}

/// A JSON string as Python's json writes it: `\"`, `\\` and the short escapes for `\b \f \n \r
/// \t`, `\u00XX` for other control characters, and with `ensure_ascii` every character outside
/// printable ASCII as `\uXXXX` (a surrogate pair beyond the BMP).
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-0.5, "-0.5"),
            (2.5, "2.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (1.5e300, "1.5e+300"),
            (-2.5e-7, "-2.5e-07"),
            (123.456, "123.456"),
            (-0.0, "-0.0"),
            (f64::INFINITY, "inf"),
        ];
        for (value, expected) in cases {
            assert_eq!(float_repr(value), expected, "repr({value:?})");
        }
    }

    #[test]
    fn whitespace_is_python_whitespace() {
        assert!(is_python_whitespace('\u{1f}'));
        assert!(is_python_whitespace('\u{a0}'));
        assert!(is_python_whitespace('\u{3000}'));
        assert!(!is_python_whitespace('\u{200b}'));
        assert_eq!(strip("\u{1c} a \u{1f}", None, StripSide::Both), "a");
        assert_eq!(strip("xxaxx", Some("x"), StripSide::Start), "axx");
        assert_eq!(strip("xxaxx", Some("x"), StripSide::End), "xxa");
    }

    #[test]
    fn split_whitespace_matches_python() {
        assert_eq!(split_whitespace("  a  b\tc\n", None), ["a", "b", "c"]);
        assert_eq!(split_whitespace("  a b  c ", Some(1)), ["a", "b  c "]);
        assert_eq!(split_whitespace("a ", Some(1)), ["a"]);
        assert_eq!(split_whitespace("a b", Some(0)), ["a b"]);
        assert_eq!(split_whitespace("a b", Some(-1)), ["a", "b"]);
        assert!(split_whitespace(" \u{1d} ", None).is_empty());
    }

    #[test]
    fn json_strings_escape_like_python() {
        let mut out = String::new();
        write_json_string(&mut out, "a\"\\\n\u{1}\u{7f}é👋<>&'", false);
        assert_eq!(out, "\"a\\\"\\\\\\n\\u0001\u{7f}é👋<>&'\"");
        out.clear();
        write_json_string(&mut out, "\u{7f}é👋", true);
        assert_eq!(out, "\"\\u007f\\u00e9\\ud83d\\udc4b\"");
    }
}
