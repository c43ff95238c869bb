//! Encodes any JSON-able Erlang term to JSON bytes with serde, the way the
//! original Convoy encoded non-binary data: maps become objects, lists arrays,
//! `true`/`false`/`nil` the JSON literals, other atoms and binaries strings.
//! Pids, references, ports, functions and tuples have no JSON form.

use rustler::{Binary, Term, TermType};
use serde::ser::{Error as _, SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

pub fn encode(term: Term) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(64);
    serde_json::to_writer(&mut out, &JsonTerm(term)).map_err(|e| e.to_string())?;
    Ok(out)
}

struct JsonTerm<'a>(Term<'a>);

impl Serialize for JsonTerm<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let term = self.0;
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
                    Err(S::Error::custom("integer out of the 64-bit range"))
                }
            }
            TermType::Float => s.serialize_f64(
                term.decode::<f64>()
                    .map_err(|_| S::Error::custom("bad float"))?,
            ),
            TermType::List => {
                let items = proper_list(term).map_err(S::Error::custom)?;
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&JsonTerm(item))?;
                }
                seq.end()
            }
            TermType::Map => {
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
                        &JsonTerm(value),
                    )?;
                }
                map.end()
            }
            TermType::Tuple => Err(S::Error::custom("a tuple has no JSON form")),
            TermType::Pid => Err(S::Error::custom("a pid has no JSON form")),
            TermType::Port => Err(S::Error::custom("a port has no JSON form")),
            TermType::Ref => Err(S::Error::custom("a reference has no JSON form")),
            TermType::Fun => Err(S::Error::custom("a function has no JSON form")),
            TermType::Unknown => Err(S::Error::custom("a term of unknown type has no JSON form")),
        }
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
