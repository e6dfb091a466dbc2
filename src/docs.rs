//! Command argument docs: the `arguments` of `COMMAND DOCS`, derived from the synopsis
//! strings of the command table.
//!
//! Every row of [`crate::commands::COMMANDS`] carries its arguments as one synopsis line
//! (`key value [NX|XX] [GET] [EX seconds|PX milliseconds|…|KEEPTTL]`), which the README,
//! the client's hints and `help` show as is. Redis 7 describes arguments as a tree
//! instead, and `redis-cli` builds its hints and `help SET` from that tree (its
//! `cliConcatArguments`). [`parse`] turns a synopsis into that tree ([`Arg`]), [`render`]
//! turns the tree back into a line with redis-cli's own algorithm (a test renders every
//! row and expects its synopsis back, so what redis-cli shows is what the table says),
//! and [`write_arguments`] writes the tree in `COMMAND DOCS`'s reply shape.
//!
//! The synopsis grammar, loosest first:
//!
//! - `a|b c|d`: alternatives (a `oneof`), each a sequence;
//! - `a b c`: a sequence (several arguments, or a `block` when it is one alternative or
//!   one bracketed part);
//! - `[…]`: an optional part;
//! - `X [X …]` (the bracket's content, before `…`, equals the arguments just before
//!   it): those arguments repeat (`multiple`; a `block` when there are several; with
//!   `multiple_token` when the repeated part starts with the token);
//! - an upper-case word (`EX`, `NO-EVICT`) is a token: alone a `pure-token`, followed by
//!   one lower-case word an argument with that token (`EX seconds`), followed by several
//!   a `block` with that token (`AUTH username password`);
//! - a lower-case word is an argument whose type (`key`, `integer`, `pattern`, …) comes
//!   from its name ([`arg_type`]).

use crate::protocol::{
    Proto, write_array_len, write_bulk, write_map_len, write_set_len, write_simple,
};

/// What kind of argument an [`Arg`] is: Redis's argument types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    Key,
    String,
    Integer,
    Double,
    Pattern,
    UnixTime,
    /// A word sent as is (`NX`).
    PureToken,
    /// One of the nested arguments.
    OneOf,
    /// All the nested arguments, in order.
    Block,
}

impl ArgType {
    /// The name `COMMAND DOCS` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ArgType::Key => "key",
            ArgType::String => "string",
            ArgType::Integer => "integer",
            ArgType::Double => "double",
            ArgType::Pattern => "pattern",
            ArgType::UnixTime => "unix-time",
            ArgType::PureToken => "pure-token",
            ArgType::OneOf => "oneof",
            ArgType::Block => "block",
        }
    }
}

/// One argument of a command, as `COMMAND DOCS` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub name: String,
    pub kind: ArgType,
    /// The word that introduces the argument (`EX` in `EX seconds`).
    pub token: Option<String>,
    pub optional: bool,
    pub multiple: bool,
    /// When repeated, the token is repeated too (`[GET parameter …]`).
    pub multiple_token: bool,
    /// The nested arguments of a `oneof` or `block`.
    pub args: Vec<Arg>,
}

impl Arg {
    fn new(name: &str, kind: ArgType) -> Arg {
        Arg {
            name: name.to_string(),
            kind,
            token: None,
            optional: false,
            multiple: false,
            multiple_token: false,
            args: Vec::new(),
        }
    }

    /// A `block` (or `oneof`) of `args`, named after them as Redis names its blocks
    /// (`username-password`).
    fn group(kind: ArgType, args: Vec<Arg>) -> Arg {
        let name = args
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join("-");
        Arg {
            args,
            ..Arg::new(&name, kind)
        }
    }

    /// Whether `self` is `other` with the same shape (for `X [X …]`), ignoring the
    /// repetition and optional flags that the repetition itself sets.
    fn same_as(&self, other: &Arg) -> bool {
        self.name == other.name
            && self.kind == other.kind
            && self.token == other.token
            && self.args.len() == other.args.len()
            && self.args.iter().zip(&other.args).all(|(a, b)| a == b)
    }
}

/// The type of a named argument of `command` (Redis's types for the same arguments).
pub fn arg_type(command: &str, name: &str) -> ArgType {
    match (command, name) {
        ("incrbyfloat", "increment") | ("debug", "seconds") => ArgType::Double,
        (_, "key" | "newkey" | "source" | "destination") => ArgType::Key,
        (_, "pattern") => ArgType::Pattern,
        (_, "unix-time-seconds" | "unix-time-milliseconds") => ArgType::UnixTime,
        (
            _,
            "seconds" | "milliseconds" | "count" | "increment" | "decrement" | "offset" | "start"
            | "end" | "cursor" | "numreplicas" | "timeout" | "index" | "protover"
            | "destination-db",
        ) => ArgType::Integer,
        _ => ArgType::String,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok<'a> {
    Open,
    Close,
    Bar,
    Ellipsis,
    Word(&'a str),
}

fn tokenize(s: &str) -> Vec<Tok<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        let len = c.len_utf8();
        match c {
            c if c.is_whitespace() => rest = &rest[len..],
            '[' | ']' | '|' | '…' => {
                out.push(match c {
                    '[' => Tok::Open,
                    ']' => Tok::Close,
                    '|' => Tok::Bar,
                    _ => Tok::Ellipsis,
                });
                rest = &rest[len..];
            }
            _ => {
                let end = rest
                    .find(|c: char| c.is_whitespace() || "[]|…".contains(c))
                    .unwrap_or(rest.len());
                out.push(Tok::Word(&rest[..end]));
                rest = &rest[end..];
            }
        }
    }
    out
}

/// A token word: upper-case letters, digits and dashes, at least one letter.
fn is_token(w: &str) -> bool {
    w.bytes().any(|b| b.is_ascii_uppercase())
        && w.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
}

/// Parses `synopsis` (a row's `args`) into `COMMAND DOCS` arguments for `command`.
/// An empty synopsis has no arguments; a malformed one is an error naming the problem.
pub fn parse(command: &str, synopsis: &str) -> Result<Vec<Arg>, String> {
    let toks = tokenize(synopsis);
    let mut p = Parser {
        command,
        toks: &toks,
        pos: 0,
    };
    let alts = p.alternatives()?;
    if p.pos != toks.len() {
        return Err(format!(
            "unexpected {:?} (a ']' or a '…' outside a bracket) in {synopsis:?}",
            toks[p.pos]
        ));
    }
    Ok(match alts.len() {
        1 => alts.into_iter().next().unwrap_or_default(),
        _ => vec![Arg::group(
            ArgType::OneOf,
            alts.into_iter().map(one).collect(),
        )],
    })
}

/// A sequence as one argument: itself when it has one, else a block.
fn one(mut seq: Vec<Arg>) -> Arg {
    if seq.len() == 1 {
        seq.remove(0)
    } else {
        Arg::group(ArgType::Block, seq)
    }
}

struct Parser<'a, 't> {
    command: &'a str,
    toks: &'t [Tok<'t>],
    pos: usize,
}

impl<'t> Parser<'_, 't> {
    fn peek(&self) -> Option<&'t Tok<'t>> {
        self.toks.get(self.pos)
    }

    /// `seq (| seq)*`, up to a `]` or the end.
    fn alternatives(&mut self) -> Result<Vec<Vec<Arg>>, String> {
        let mut alts = vec![self.sequence()?];
        while self.peek() == Some(&Tok::Bar) {
            self.pos += 1;
            alts.push(self.sequence()?);
        }
        if alts.iter().any(Vec::is_empty) && alts.len() > 1 {
            return Err(format!("an empty alternative in {}", self.command));
        }
        Ok(alts)
    }

    /// Arguments up to a `|`, a `]`, a `…` or the end.
    fn sequence(&mut self) -> Result<Vec<Arg>, String> {
        let mut seq: Vec<Arg> = Vec::new();
        while let Some(tok) = self.peek().cloned() {
            match tok {
                // A `…` ends the bracket's repeated part; elsewhere the caller refuses it.
                Tok::Bar | Tok::Close | Tok::Ellipsis => break,
                Tok::Open => {
                    self.pos += 1;
                    self.bracket(&mut seq)?;
                }
                Tok::Word(w) if is_token(w) => {
                    self.pos += 1;
                    let mut words = Vec::new();
                    while let Some(Tok::Word(next)) = self.peek()
                        && !is_token(next)
                    {
                        words.push(self.typed(next));
                        self.pos += 1;
                    }
                    let mut arg = match words.len() {
                        0 => Arg::new(&w.to_ascii_lowercase(), ArgType::PureToken),
                        1 => words.remove(0),
                        _ => Arg::group(ArgType::Block, words),
                    };
                    arg.token = Some(w.to_string());
                    seq.push(arg);
                }
                Tok::Word(w) => {
                    self.pos += 1;
                    seq.push(self.typed(w));
                }
            }
        }
        Ok(seq)
    }

    fn typed(&self, name: &str) -> Arg {
        Arg::new(name, arg_type(self.command, name))
    }

    /// After a `[`: an optional part, or `[X …]` repeating the arguments before it.
    fn bracket(&mut self, seq: &mut Vec<Arg>) -> Result<(), String> {
        let mut alts = self.alternatives()?;
        let repeat = alts.len() == 1 && self.peek() == Some(&Tok::Ellipsis);
        if repeat {
            self.pos += 1;
        }
        if self.peek() != Some(&Tok::Close) {
            return Err(format!("an unclosed '[' in {}", self.command));
        }
        self.pos += 1;
        if repeat {
            let rep = alts.remove(0);
            return self.fold_repetition(seq, rep);
        }
        let mut arg = match alts.len() {
            1 => one(alts.remove(0)),
            _ => Arg::group(ArgType::OneOf, alts.into_iter().map(one).collect()),
        };
        if arg.optional {
            return Err(format!("'[[…]]' in {}", self.command));
        }
        arg.optional = true;
        seq.push(arg);
        Ok(())
    }

    /// `X [X …]`: marks the last arguments of `seq` (those `rep` spells again) as
    /// repeating.
    fn fold_repetition(&self, seq: &mut Vec<Arg>, rep: Vec<Arg>) -> Result<(), String> {
        let err = || {
            format!(
                "'[… …]' in {} does not repeat the arguments before it",
                self.command
            )
        };
        let k = rep.len();
        if k == 0 || seq.len() < k {
            return Err(err());
        }
        if k == 1 {
            let (last, r) = (seq.last_mut().ok_or_else(err)?, &rep[0]);
            if last.same_as(r) {
                // `GET parameter [GET parameter …]`
                last.multiple_token = last.token.is_some();
            } else {
                // `GET parameter [parameter …]`: the token is not repeated.
                let mut bare = last.clone();
                bare.token = None;
                if last.token.is_none() || !bare.same_as(r) {
                    return Err(err());
                }
            }
            last.multiple = true;
            return Ok(());
        }
        let tail = seq.split_off(seq.len() - k);
        if !tail.iter().zip(&rep).all(|(a, b)| a.same_as(b)) {
            return Err(err());
        }
        let mut block = Arg::group(ArgType::Block, tail);
        block.multiple = true;
        seq.push(block);
        Ok(())
    }
}

/// The arguments as one line, by redis-cli's algorithm (`cliConcatArguments`), with `…`
/// where redis-cli prints `...`.
pub fn render(args: &[Arg]) -> String {
    render_joined(args, " ")
}

fn render_joined(args: &[Arg], sep: &str) -> String {
    args.iter().map(render_arg).collect::<Vec<_>>().join(sep)
}

fn render_arg(a: &Arg) -> String {
    let mut token = a.token.clone().unwrap_or_default();
    let repeat = match a.kind {
        ArgType::OneOf => render_joined(&a.args, "|"),
        ArgType::Block => render_joined(&a.args, " "),
        ArgType::PureToken => String::new(),
        _ => a.name.clone(),
    };
    if !token.is_empty() && a.kind != ArgType::PureToken {
        token.push(' ');
    }
    let mut s = String::new();
    if a.optional {
        s.push('[');
    }
    s.push_str(&token);
    s.push_str(&repeat);
    if a.multiple {
        s.push_str(" [");
        if a.multiple_token {
            s.push_str(&token);
        }
        s.push_str(&repeat);
        s.push_str(" …]");
    }
    if a.optional {
        s.push(']');
    }
    s
}

/// Writes `args` as `COMMAND DOCS` does (Redis 7's `addReplyCommandArgList`): an array
/// of maps with `name`, `type`, `display_text` (not for `oneof`/`block`), `token`,
/// `flags` (a set of `optional`, `multiple`, `multiple_token`) and the nested
/// `arguments` of a `oneof` or `block`.
pub fn write_arguments(out: &mut Vec<u8>, args: &[Arg], proto: Proto) {
    write_array_len(out, args.len());
    for a in args {
        let nested = matches!(a.kind, ArgType::OneOf | ArgType::Block);
        let flags: Vec<&str> = [
            (a.optional, "optional"),
            (a.multiple, "multiple"),
            (a.multiple_token, "multiple_token"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| *f)
        .collect();
        let len = 3 + usize::from(a.token.is_some()) + usize::from(!flags.is_empty());
        write_map_len(out, len, proto);
        write_bulk(out, b"name");
        write_bulk(out, a.name.as_bytes());
        write_bulk(out, b"type");
        write_bulk(out, a.kind.as_str().as_bytes());
        if !nested {
            write_bulk(out, b"display_text");
            write_bulk(out, a.name.as_bytes());
        }
        if let Some(t) = &a.token {
            write_bulk(out, b"token");
            write_bulk(out, t.as_bytes());
        }
        if !flags.is_empty() {
            write_bulk(out, b"flags");
            write_set_len(out, flags.len(), proto);
            for f in flags {
                write_simple(out, f);
            }
        }
        if nested {
            write_bulk(out, b"arguments");
            write_arguments(out, &a.args, proto);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::COMMANDS;
    use crate::protocol::{Value, parse_value};

    fn tok(name: &str, token: &str, kind: ArgType) -> Arg {
        Arg {
            token: Some(token.into()),
            ..Arg::new(name, kind)
        }
    }

    #[test]
    fn every_synopsis_renders_back_as_redis_cli_would_show_it() {
        for c in COMMANDS {
            let args = parse(c.name, c.args).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert_eq!(render(&args), c.args, "{}", c.name);
        }
    }

    #[test]
    fn set_is_redis_shaped() {
        let args = parse(
            "set",
            "key value [NX|XX] [GET] [EX seconds|PX milliseconds|EXAT unix-time-seconds|KEEPTTL]",
        )
        .unwrap();
        assert_eq!(args.len(), 5);
        assert_eq!(args[0], Arg::new("key", ArgType::Key));
        assert_eq!(args[1], Arg::new("value", ArgType::String));
        assert_eq!(args[2].kind, ArgType::OneOf);
        assert!(args[2].optional);
        assert_eq!(
            args[2].args,
            vec![
                tok("nx", "NX", ArgType::PureToken),
                tok("xx", "XX", ArgType::PureToken)
            ]
        );
        assert_eq!(
            args[3],
            Arg {
                optional: true,
                ..tok("get", "GET", ArgType::PureToken)
            }
        );
        assert_eq!(
            args[4].args,
            vec![
                tok("seconds", "EX", ArgType::Integer),
                tok("milliseconds", "PX", ArgType::Integer),
                tok("unix-time-seconds", "EXAT", ArgType::UnixTime),
                tok("keepttl", "KEEPTTL", ArgType::PureToken),
            ]
        );
    }

    #[test]
    fn repetitions_blocks_and_nesting() {
        let del = parse("del", "key [key …]").unwrap();
        assert_eq!(
            del,
            vec![Arg {
                multiple: true,
                ..Arg::new("key", ArgType::Key)
            }]
        );
        let mset = parse("mset", "key value [key value …]").unwrap();
        assert_eq!(mset.len(), 1);
        assert_eq!((mset[0].kind, mset[0].multiple), (ArgType::Block, true));
        assert_eq!(mset[0].name, "key-value");
        let info = parse("info", "[section [section …]]").unwrap();
        assert!(info[0].optional && info[0].multiple);
        // The token is not repeated: `multiple` only.
        let config = parse("config", "GET parameter [parameter …]|SET").unwrap();
        let get = &config[0].args[0];
        assert_eq!(get.token.as_deref(), Some("GET"));
        assert!(get.multiple && !get.multiple_token);
        let repeated = parse("x", "KEY k [KEY k …]").unwrap();
        assert!(repeated[0].multiple && repeated[0].multiple_token);
        // A token with several words is a block with that token.
        let hello = parse(
            "hello",
            "[protover [AUTH username password] [SETNAME name]]",
        )
        .unwrap();
        assert_eq!((hello[0].kind, hello[0].optional), (ArgType::Block, true));
        let auth = &hello[0].args[1];
        assert_eq!(auth.kind, ArgType::Block);
        assert_eq!(auth.name, "username-password");
        assert_eq!(auth.token.as_deref(), Some("AUTH"));
        // Top-level alternatives are one oneof.
        let debug = parse("debug", "PANIC|SLEEP seconds").unwrap();
        assert_eq!(debug.len(), 1);
        assert_eq!(debug[0].args[1], tok("seconds", "SLEEP", ArgType::Double));
        assert_eq!(parse("dbsize", "").unwrap(), vec![]);
    }

    #[test]
    fn malformed_synopses_are_errors() {
        for bad in [
            "[key",
            "key]",
            "key …",
            "value [key …]",
            "[a|b …]",
            "a||b",
            "[[a]]",
        ] {
            assert!(parse("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn written_in_command_docs_shape() {
        let args = parse("set", "key [NX|XX]").unwrap();
        for proto in [Proto::Resp2, Proto::Resp3] {
            let mut out = Vec::new();
            write_arguments(&mut out, &args, proto);
            let (v, used) = parse_value(&out).unwrap().unwrap();
            assert_eq!(used, out.len());
            let Value::Array(items) = v else {
                panic!("{v:?}")
            };
            assert_eq!(items.len(), 2);
            let pairs = |v: &Value| -> Vec<(String, Value)> {
                let flat: Vec<Value> = match v {
                    Value::Map(p) => p.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect(),
                    Value::Array(a) => a.clone(),
                    other => panic!("{other:?}"),
                };
                flat.chunks(2)
                    .map(|kv| match &kv[0] {
                        Value::Bulk(k) => (String::from_utf8_lossy(k).into_owned(), kv[1].clone()),
                        other => panic!("{other:?}"),
                    })
                    .collect()
            };
            let key = pairs(&items[0]);
            let names: Vec<&str> = key.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(names, ["name", "type", "display_text"]);
            assert_eq!(key[1].1, Value::Bulk(b"key".to_vec()));
            let cond = pairs(&items[1]);
            let names: Vec<&str> = cond.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(names, ["name", "type", "flags", "arguments"]);
            let flags = match &cond[2].1 {
                Value::Set(f) | Value::Array(f) => f.clone(),
                other => panic!("{other:?}"),
            };
            assert_eq!(flags, vec![Value::Simple("optional".into())]);
            let Value::Array(nested) = &cond[3].1 else {
                panic!("{:?}", cond[3].1)
            };
            let nx = pairs(&nested[0]);
            assert_eq!(nx[1].1, Value::Bulk(b"pure-token".to_vec()));
            assert_eq!(nx[3], ("token".into(), Value::Bulk(b"NX".to_vec())));
        }
    }
}
