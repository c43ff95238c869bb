//! Calendar arithmetic for record timestamps: Unix milliseconds to a UTC
//! date and time, so the NIF can build an Elixir `DateTime` directly.

/// A UTC date and time with millisecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millisecond: u32,
}

/// Converts Unix time in milliseconds (negative before 1970) to UTC.
pub fn from_unix_ms(ms: i64) -> Civil {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    Civil {
        year,
        month,
        day,
        hour: (in_day / 3_600_000) as u32,
        minute: (in_day / 60_000 % 60) as u32,
        second: (in_day / 1_000 % 60) as u32,
        millisecond: (in_day % 1_000) as u32,
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), by
/// counting 400-year eras of 146,097 days from 0000-03-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn civil(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32, ms: u32) -> Civil {
        Civil {
            year: y,
            month: mo,
            day: d,
            hour: h,
            minute: mi,
            second: s,
            millisecond: ms,
        }
    }

    #[test]
    fn epoch() {
        assert_eq!(from_unix_ms(0), civil(1970, 1, 1, 0, 0, 0, 0));
    }

    #[test]
    fn known_instants() {
        // 2026-11-28T08:16:47.123Z, as `date -u -d @1795853807` prints it.
        assert_eq!(
            from_unix_ms(1_795_853_807_123),
            civil(2026, 11, 28, 8, 16, 47, 123)
        );
        // A leap day.
        assert_eq!(
            from_unix_ms(951_782_400_000),
            civil(2000, 2, 29, 0, 0, 0, 0)
        );
        // Before the epoch.
        assert_eq!(from_unix_ms(-1), civil(1969, 12, 31, 23, 59, 59, 999));
    }

    #[test]
    fn every_day_follows_the_previous() {
        let mut previous = from_unix_ms(-86_400_000 * 366 * 5);
        for day in (-366 * 5 + 1)..(366 * 60) {
            let next = from_unix_ms(day * 86_400_000 + 43_200_000);
            if next.year == previous.year && next.month == previous.month {
                assert_eq!(next.day, previous.day + 1, "{next:?}");
            } else {
                assert_eq!(next.day, 1, "{next:?}");
                assert!(matches!(previous.day, 28..=31), "{previous:?}");
            }
            previous = next;
        }
        assert_eq!(previous.year, 2030);
    }
}
