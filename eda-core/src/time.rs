//! RFC 3339 timestamps, as CloudEvents `time` carries them: every form the RFC allows is read
//! (`T`, `t` or a space between date and time, any fraction, `Z`, `z` or a `±HH:MM` offset),
//! and the instant is kept exactly, offset applied.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Reads an RFC 3339 date-time.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// let utc = eda_core::time::parse_rfc3339("2026-01-02T03:04:05Z").unwrap();
/// let offset = eda_core::time::parse_rfc3339("2026-01-02t05:04:05.5+02:00").unwrap();
/// assert_eq!(offset.duration_since(utc).unwrap(), Duration::from_millis(500));
/// ```
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    let b = text.as_bytes();
    let bad = |what: &str| format!("`{text}` is not an RFC 3339 date-time ({what}): write `2026-01-02T03:04:05Z`");
    let digits = |from: usize, len: usize| -> Option<u64> {
        let part = b.get(from..from + len)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let (Some(year), Some(month), Some(day)) = (digits(0, 4), digits(5, 2), digits(8, 2)) else {
        return Err(bad("the date is `YYYY-MM-DD`"));
    };
    if !(at(4, b'-') && at(7, b'-') && matches!(b.get(10), Some(b'T' | b't' | b' '))) {
        return Err(bad("the date is `YYYY-MM-DD`, then `T`"));
    }
    let (Some(hour), Some(minute), Some(second)) = (digits(11, 2), digits(14, 2), digits(17, 2)) else {
        return Err(bad("the time is `HH:MM:SS`"));
    };
    if !(at(13, b':') && at(16, b':')) {
        return Err(bad("the time is `HH:MM:SS`"));
    }
    let mut i = 19;
    let mut nanos = 0u64;
    if at(i, b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err(bad("a `.` needs digits after it"));
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset_seconds: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && at(i + 3, b':') => {
            let (Some(h), Some(m)) = (digits(i + 1, 2), digits(i + 4, 2)) else {
                return Err(bad("the offset is `±HH:MM`"));
            };
            if h > 23 || m > 59 {
                return Err(bad("the offset is `±HH:MM`"));
            }
            let magnitude = (h * 3600 + m * 60) as i64;
            if *sign == b'-' {
                -magnitude
            } else {
                magnitude
            }
        }
        _ => return Err(bad("it ends in `Z` or an offset such as `+02:00`")),
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&month) || day == 0 || day > month_days[(month - 1) as usize] {
        return Err(bad("no such day"));
    }
    // 60 is a leap second.
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad("no such time of day"));
    }
    let local =
        days_from_civil(year as i64, month as i64, day as i64) * 86_400 + (hour * 3600 + minute * 60 + second) as i64;
    let seconds = local - offset_seconds;
    let since = |s: i64| Duration::from_secs(s.unsigned_abs());
    let instant =
        if seconds >= 0 { UNIX_EPOCH.checked_add(since(seconds)) } else { UNIX_EPOCH.checked_sub(since(seconds)) };
    instant
        .and_then(|t| t.checked_add(Duration::from_nanos(nanos)))
        .ok_or_else(|| bad("out of the range this system keeps"))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        parse_rfc3339(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_rfc_3339_form_reads_as_the_same_instant() {
        let utc = at("2026-03-01T10:00:00Z");
        assert_eq!(utc, UNIX_EPOCH + Duration::from_secs(1_772_359_200));
        for same in [
            "2026-03-01T12:00:00+02:00",
            "2026-03-01t10:00:00z",
            "2026-03-01 10:00:00Z",
            "2026-03-01T05:30:00-04:30",
            "2026-03-01T10:00:00.000000000Z",
            "2026-02-28T23:00:00-11:00",
        ] {
            assert_eq!(at(same), utc, "{same}");
        }
        assert_eq!(at("2026-03-01T12:00:00.25+02:00"), utc + Duration::from_millis(250));
        assert_eq!(at("2026-03-01T10:00:00.123456789123Z"), utc + Duration::from_nanos(123_456_789));
        assert_eq!(at("1970-01-01T00:00:00Z"), UNIX_EPOCH);
        assert_eq!(at("1970-01-01T00:30:00+01:00") + Duration::from_secs(1800), UNIX_EPOCH);
        assert_eq!(at("2024-02-29T00:00:00Z"), UNIX_EPOCH + Duration::from_secs(1_709_164_800));
    }

    #[test]
    fn what_is_not_rfc_3339_is_refused_with_an_example() {
        for wrong in [
            "2026-03-01",
            "2026-03-01T10:00:00",
            "2026-03-01T10:00:00+0200",
            "2026-02-30T10:00:00Z",
            "2026-03-01T24:00:00Z",
            "2026-03-01T10:00:00.Z",
            "2026-03-01T10:00:00Zjunk",
        ] {
            let e = parse_rfc3339(wrong).expect_err(wrong);
            assert!(e.contains("2026-01-02T03:04:05Z"), "{e}");
        }
    }
}
