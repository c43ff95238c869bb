//! Record arrival times as Elixir `%DateTime{}` structs in UTC, built here
//! rather than converted in Elixir for every record.

use rustler::{Encoder, Env, Term};

use convoy_core::civil;

use crate::atoms;

/// `%DateTime{}` for Unix milliseconds, or `nil` when Kinesis gave none (0).
pub fn utc_datetime(env: Env<'_>, unix_ms: i64) -> Term<'_> {
    if unix_ms <= 0 {
        return atoms::nil().encode(env);
    }
    let c = civil::from_unix_ms(unix_ms);
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
        "Etc/UTC".encode(env),
        "UTC".encode(env),
        0i32.encode(env),
        0i32.encode(env),
    ];
    Term::map_from_term_arrays(env, &keys, &values).expect("distinct keys")
}
