//! Parsers for the forms of values the variables take: names, durations, sizes, addresses.
//! Each returns the expected form as its error, for the one-line message naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

/// Longest AMQP short string (queue, exchange and routing key names).
pub(crate) const SHORT_STR_MAX: usize = 255;

/// An address like `127.0.0.1:9476`, or `off`: `None`.
pub(crate) fn addr_or_off(v: &str, example: &str) -> Result<Option<SocketAddr>, String> {
    if v == "off" {
        Ok(None)
    } else {
        v.parse::<SocketAddr>()
            .map(Some)
            .map_err(|_| format!("an address like {example}, or off"))
    }
}

/// `on` or `off`.
pub(crate) fn on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("on or off".into()),
    }
}

pub(crate) fn short_str(v: &str) -> Result<String, String> {
    if v.len() > SHORT_STR_MAX {
        Err(format!("at most {SHORT_STR_MAX} bytes"))
    } else {
        Ok(v.to_string())
    }
}

/// A queue or exchange name: non-empty, and short enough that `reserve` more bytes still fit.
pub(crate) fn name(v: &str, reserve: usize) -> Result<String, String> {
    let max = SHORT_STR_MAX - reserve;
    if v.is_empty() || v.len() > max {
        Err(format!("a name of 1 to {max} bytes"))
    } else {
        Ok(v.to_string())
    }
}

pub(crate) fn exchange_type(v: &str) -> Result<String, String> {
    match v {
        "direct" | "fanout" | "topic" | "headers" => Ok(v.to_string()),
        _ if v.starts_with("x-") && v.len() > 2 && v.len() <= SHORT_STR_MAX => Ok(v.to_string()),
        _ => Err("direct, fanout, topic, headers or a plugin type x-…".into()),
    }
}

pub(crate) fn boolean(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("true or false".into()),
    }
}

pub(crate) fn duration(v: &str, zero_ok: bool) -> Result<Duration, String> {
    let expected = || {
        format!(
            "a {}duration like 90s, 15m, 24h or 7d",
            if zero_ok { "" } else { "non-zero " }
        )
    };
    match humantime::parse_duration(v) {
        Ok(d) if zero_ok || d.as_millis() > 0 => Ok(d),
        _ => Err(expected()),
    }
}

/// A header name: 1 to 255 bytes (an AMQP short string).
pub(crate) fn header_name(h: &str) -> Option<String> {
    (!h.is_empty() && h.len() <= SHORT_STR_MAX).then(|| h.to_string())
}

/// A size: bytes, or a number with a binary suffix `K`, `M`, `G`, `T` (`KiB`, `MB`... accepted).
pub(crate) fn size(v: &str) -> Result<u64, String> {
    let expected = || "a size like 512K, 64M, 1G or a byte count".to_string();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(digits);
    let number: u64 = number.parse().map_err(|_| expected())?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(expected()),
    };
    number
        .checked_mul(1 << shift)
        .filter(|n| *n > 0)
        .ok_or_else(expected)
}
