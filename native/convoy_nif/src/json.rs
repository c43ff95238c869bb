//! Encodes any JSON-able Erlang term to JSON bytes with serde, the way the
//! original Convoy encoded non-binary data with Poison: maps become objects
//! (structs without their `__struct__` key), lists arrays, `true`/`false`/`nil`
//! the JSON literals, other atoms and binaries strings, and `DateTime`,
//! `NaiveDateTime`, `Date` and `Time` ISO 8601 strings (as their
//! `to_iso8601/1` writes them). Pids, references, ports, functions and tuples
//! have no JSON form: the error names where in the term the value is.

use std::cell::RefCell;
use std::fmt::Write as _;

use rustler::{Binary, Term, TermType};
use serde::ser::{Error as _, SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use crate::atoms;

/// The JSON bytes of `term`, or why it has none: `"a pid has no JSON form,
/// at [:user][\"owner\"][2]"` (no location when the term itself is at fault).
pub fn encode(term: Term) -> Result<Vec<u8>, String> {
    let trail = RefCell::new(Vec::new());
    let mut out = Vec::with_capacity(64);
    match serde_json::to_writer(
        &mut out,
        &JsonTerm {
            term,
            trail: &trail,
        },
    ) {
        Ok(()) => Ok(out),
        Err(error) => {
            let mut message = error.to_string();
            let trail = trail.into_inner();
            if !trail.is_empty() {
                message.push_str(", at ");
                // Segments were pushed from the innermost out.
                for segment in trail.iter().rev() {
                    message.push_str(segment);
                }
            }
            Err(message)
        }
    }
}

/// A term to serialize, and the location of a failure, filled only on the
/// way back out of an error: a successful encoding pays nothing for it.
struct JsonTerm<'a, 't> {
    term: Term<'a>,
    trail: &'t RefCell<Vec<String>>,
}

impl<'a, 't> JsonTerm<'a, 't> {
    fn child(&self, term: Term<'a>) -> Self {
        JsonTerm {
            term,
            trail: self.trail,
        }
    }

    /// Records where an error happened, on its way out.
    fn mark(&self, segment: String) {
        self.trail.borrow_mut().push(segment);
    }
}

impl Serialize for JsonTerm<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let term = self.term;
        match term.get_type() {
            TermType::Atom => {
                let name = term
                    .atom_to_string()
                    .map_err(|_| S::Error::custom("bad atom"))?;
                match name.as_str() {
                    "true" => s.serialize_bool(true),
                    "false" => s.serialize_bool(false),
                    "nil" => s.serialize_unit(),
                    _ => s.serialize_str(&name),
                }
            }
            TermType::Binary => s.serialize_str(binary_str(term).map_err(S::Error::custom)?),
            TermType::Integer => {
                if let Ok(i) = term.decode::<i64>() {
                    s.serialize_i64(i)
                } else if let Ok(u) = term.decode::<u64>() {
                    s.serialize_u64(u)
                } else {
                    Err(S::Error::custom("an integer out of the 64-bit range"))
                }
            }
            TermType::Float => s.serialize_f64(
                term.decode::<f64>()
                    .map_err(|_| S::Error::custom("bad float"))?,
            ),
            TermType::List => self.serialize_list(s),
            TermType::Map => self.serialize_map(s),
            TermType::Tuple => Err(S::Error::custom("a tuple has no JSON form")),
            TermType::Pid => Err(S::Error::custom("a pid has no JSON form")),
            TermType::Port => Err(S::Error::custom("a port has no JSON form")),
            TermType::Ref => Err(S::Error::custom("a reference has no JSON form")),
            TermType::Fun => Err(S::Error::custom("a function has no JSON form")),
            TermType::Unknown => Err(S::Error::custom("a term of unknown type has no JSON form")),
        }
    }
}

impl JsonTerm<'_, '_> {
    fn serialize_list<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let items = proper_list(self.term).map_err(S::Error::custom)?;
        let mut seq = s.serialize_seq(Some(items.len()))?;
        for (index, item) in items.into_iter().enumerate() {
            seq.serialize_element(&self.child(item))
                .inspect_err(|_| self.mark(format!("[{index}]")))?;
        }
        seq.end()
    }

    /// A map, or a calendar struct as its ISO 8601 string; other structs
    /// lose their `__struct__` key.
    fn serialize_map<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let term = self.term;
        if let Some(text) = calendar_string(term).map_err(S::Error::custom)? {
            return s.serialize_str(&text);
        }
        let iter = rustler::types::map::MapIterator::new(term)
            .ok_or_else(|| S::Error::custom("bad map"))?;
        let mut map = s.serialize_map(None)?;
        for (key, value) in iter {
            if key.get_type() == TermType::Atom
                && key.atom_to_string().is_ok_and(|k| k == "__struct__")
            {
                continue;
            }
            map.serialize_entry(
                &key_string(key).map_err(S::Error::custom)?,
                &self.child(value),
            )
            .inspect_err(|_| self.mark(format!("[{}]", describe_key(key))))?;
        }
        map.end()
    }
}

/// The elements of a proper list; an improper one (`[1 | 2]`) has no JSON form.
fn proper_list(mut term: Term) -> Result<Vec<Term>, &'static str> {
    let mut items = Vec::new();
    while !term.is_empty_list() {
        let (head, tail) = term
            .list_get_cell()
            .map_err(|_| "an improper list has no JSON form")?;
        items.push(head);
        term = tail;
    }
    Ok(items)
}

fn binary_str<'a>(term: Term<'a>) -> Result<&'a str, String> {
    let bin = Binary::from_term(term).map_err(|_| "a bitstring has no JSON form".to_string())?;
    std::str::from_utf8(bin.as_slice())
        .map_err(|_| "a binary that is not UTF-8 has no JSON form".to_string())
}

/// JSON object keys must be strings: binaries, atoms and numbers qualify.
fn key_string(term: Term) -> Result<String, String> {
    match term.get_type() {
        TermType::Binary => binary_str(term).map(str::to_owned),
        TermType::Atom => term
            .atom_to_string()
            .map_err(|_| "bad atom key".to_string()),
        TermType::Integer => term
            .decode::<i64>()
            .map(|i| i.to_string())
            .map_err(|_| "integer key out of range".to_string()),
        TermType::Float => term
            .decode::<f64>()
            .map(|f| f.to_string())
            .map_err(|_| "bad float key".to_string()),
        _ => Err("map keys must be binaries, atoms or numbers".to_string()),
    }
}

/// A map key as Elixir code would write it, for error locations.
fn describe_key(term: Term) -> String {
    match term.get_type() {
        TermType::Atom => term
            .atom_to_string()
            .map(|a| {
                let plain = a
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '?' || c == '!');
                if plain && !a.starts_with(|c: char| c.is_ascii_digit()) {
                    format!(":{a}")
                } else {
                    format!(":{a:?}")
                }
            })
            .unwrap_or_else(|_| "?".into()),
        TermType::Binary => match binary_str(term) {
            Ok(s) => format!("{s:?}"),
            Err(_) => "<<...>>".into(),
        },
        TermType::Integer => term
            .decode::<i64>()
            .map(|i| i.to_string())
            .unwrap_or_else(|_| "?".into()),
        TermType::Float => term
            .decode::<f64>()
            .map(|f| f.to_string())
            .unwrap_or_else(|_| "?".into()),
        _ => "?".into(),
    }
}

// ---------------------------------------------------------------------------
// Calendar types, as Poison encoded them: `to_iso8601/1` strings

/// `Some(iso8601)` for a `%DateTime{}`, `%NaiveDateTime{}`, `%Date{}` or
/// `%Time{}` of the ISO calendar; `None` for any other map.
fn calendar_string(term: Term) -> Result<Option<String>, String> {
    let Some(value) = Calendar::of(term) else {
        return Ok(None);
    };
    let calendar = value
        .field(atoms::calendar())?
        .atom_to_string()
        .unwrap_or_default();
    if calendar != "Elixir.Calendar.ISO" {
        return Err(format!(
            "a %{}{{}} in calendar {} has no JSON form",
            value.name,
            calendar.trim_start_matches("Elixir.")
        ));
    }
    let mut out = String::with_capacity(32);
    if value.kind != Kind::Time {
        value.write_date(&mut out)?;
        if value.kind == Kind::Date {
            return Ok(Some(out));
        }
        out.push('T');
    }
    value.write_time(&mut out)?;
    if value.kind == Kind::DateTime {
        value.write_offset(&mut out)?;
    }
    Ok(Some(out))
}

/// A calendar struct being written, its fields read by name.
struct Calendar<'a> {
    term: Term<'a>,
    kind: Kind,
    /// The struct's name without `Elixir.`, for errors.
    name: String,
}

impl<'a> Calendar<'a> {
    fn of(term: Term<'a>) -> Option<Self> {
        let module = term
            .map_get(atoms::struct_().to_term(term.get_env()))
            .ok()?
            .atom_to_string()
            .ok()?;
        let kind = match module.as_str() {
            "Elixir.DateTime" => Kind::DateTime,
            "Elixir.NaiveDateTime" => Kind::NaiveDateTime,
            "Elixir.Date" => Kind::Date,
            "Elixir.Time" => Kind::Time,
            _ => return None,
        };
        let name = module.trim_start_matches("Elixir.").to_owned();
        Some(Calendar { term, kind, name })
    }

    fn field(&self, atom: rustler::Atom) -> Result<Term<'a>, String> {
        self.term
            .map_get(atom.to_term(self.term.get_env()))
            .map_err(|_| {
                format!(
                    "a %{}{{}} without all its fields has no JSON form",
                    self.name
                )
            })
    }

    fn int(&self, atom: rustler::Atom) -> Result<i64, String> {
        self.field(atom)?
            .decode::<i64>()
            .map_err(|_| format!("a %{}{{}} with a field that is not an integer", self.name))
    }

    /// `YYYY-MM-DD`, with a sign for years before 0.
    fn write_date(&self, out: &mut String) -> Result<(), String> {
        let (year, month, day) = (
            self.int(atoms::year())?,
            self.int(atoms::month())?,
            self.int(atoms::day())?,
        );
        if year < 0 {
            out.push('-');
        }
        let _ = write!(out, "{:04}-{month:02}-{day:02}", year.abs());
        Ok(())
    }

    /// `HH:MM:SS`, then as many fraction digits as the precision says.
    fn write_time(&self, out: &mut String) -> Result<(), String> {
        let (hour, minute, second) = (
            self.int(atoms::hour())?,
            self.int(atoms::minute())?,
            self.int(atoms::second())?,
        );
        let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
        let (micros, precision) = self
            .field(atoms::microsecond())?
            .decode::<(i64, usize)>()
            .map_err(|_| format!("a %{}{{}} with a bad :microsecond field", self.name))?;
        if precision > 0 {
            let digits = format!("{micros:06}");
            out.push('.');
            out.push_str(&digits[..precision.min(6)]);
        }
        Ok(())
    }

    /// `Z` in UTC, else `+HH:MM` or `-HH:MM`.
    fn write_offset(&self, out: &mut String) -> Result<(), String> {
        let offset = self.int(atoms::utc_offset())? + self.int(atoms::std_offset())?;
        let zone = self.field(atoms::time_zone())?;
        if offset == 0 && binary_str(zone).is_ok_and(|z| z == "Etc/UTC") {
            out.push('Z');
        } else {
            let sign = if offset < 0 { '-' } else { '+' };
            let total = offset.abs();
            let _ = write!(out, "{sign}{:02}:{:02}", total / 3600, total % 3600 / 60);
        }
        Ok(())
    }
}

#[derive(PartialEq, Clone, Copy)]
enum Kind {
    DateTime,
    NaiveDateTime,
    Date,
    Time,
}

/// `{:ok, json}` or `{:error, {:invalid_data, detail}}`: the same encoding
/// the producer applies, for services written in Elixir.
#[rustler::nif(schedule = "DirtyCpu")]
fn encode_json<'a>(env: rustler::Env<'a>, term: Term<'a>) -> Term<'a> {
    let result = encode(term)
        .map_err(crate::error::Error::InvalidData)
        .map(|bytes| {
            let mut bin = rustler::NewBinary::new(env, bytes.len());
            bin.as_mut_slice().copy_from_slice(&bytes);
            Binary::from(bin)
        });
    crate::error::encode_result(env, result)
}
