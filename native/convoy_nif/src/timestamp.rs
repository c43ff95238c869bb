//! Record arrival times as Elixir `%DateTime{}` structs in UTC, built here
//! rather than converted in Elixir for every record.

use rustler::{Encoder, Env, Term};

use convoy_core::civil;

use crate::atoms;

/// Builds the `%DateTime{}` terms of one message. Records of a batch often
/// arrived in the same millisecond (Kinesis stamps them as they are put, and
/// they are read in that order), so the term of the last millisecond is kept
/// and shared by the records that follow with the same stamp, and the zone
/// strings are built once: a `%DateTime{}` is a 13-key map of about 38 words,
/// most of a record's size in the message, which the receiving process then
/// copies into its heap.
pub struct DateTimes<'a> {
    env: Env<'a>,
    keys: [Term<'a>; 13],
    time_zone: Term<'a>,
    zone_abbr: Term<'a>,
    last: Option<(i64, Term<'a>)>,
}

impl<'a> DateTimes<'a> {
    pub fn new(env: Env<'a>) -> Self {
        let keys = [
            atoms::struct_(),
            atoms::calendar(),
            atoms::year(),
            atoms::month(),
            atoms::day(),
            atoms::hour(),
            atoms::minute(),
            atoms::second(),
            atoms::microsecond(),
            atoms::time_zone(),
            atoms::zone_abbr(),
            atoms::utc_offset(),
            atoms::std_offset(),
        ]
        .map(|a| a.encode(env));
        DateTimes {
            env,
            keys,
            time_zone: "Etc/UTC".encode(env),
            zone_abbr: "UTC".encode(env),
            last: None,
        }
    }

    /// `%DateTime{}` for Unix milliseconds, or `nil` when Kinesis gave none (0).
    pub fn utc(&mut self, unix_ms: i64) -> Term<'a> {
        let env = self.env;
        if unix_ms <= 0 {
            return atoms::nil().encode(env);
        }
        if let Some((ms, term)) = self.last {
            if ms == unix_ms {
                return term;
            }
        }
        let c = civil::from_unix_ms(unix_ms);
        let values = [
            atoms::elixir_date_time().encode(env),
            atoms::elixir_calendar_iso().encode(env),
            c.year.encode(env),
            c.month.encode(env),
            c.day.encode(env),
            c.hour.encode(env),
            c.minute.encode(env),
            c.second.encode(env),
            (c.millisecond * 1_000, 3u32).encode(env),
            self.time_zone,
            self.zone_abbr,
            0i32.encode(env),
            0i32.encode(env),
        ];
        let term = Term::map_from_term_arrays(env, &self.keys, &values).expect("distinct keys");
        self.last = Some((unix_ms, term));
        term
    }
}
