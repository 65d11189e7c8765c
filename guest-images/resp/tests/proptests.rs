//! Properties over random input:
//!
//! - any command sequence gives the same replies, statuses and final store whether each
//!   epoch of it is fed whole, one byte at a time, or cut at random points (the engine
//!   depends on the bytes, not on how the network split them: lockstep replay needs that);
//! - arbitrary and RESP-shaped garbage never panics, gives the same result however it is
//!   split, and only ever produces well-formed RESP replies;
//! - deleting every key brings the accounted memory back to zero.

use proptest::prelude::*;
use proptest::sample::Index;

use kvstore_resp::{Conn, ConnStatus, Store};

fn req(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Arguments that survive inline splitting unchanged.
fn inline_safe(args: &[Vec<u8>]) -> bool {
    args.iter().all(|a| !a.is_empty() && a.iter().all(|b| b.is_ascii_graphic() && !b"\"'\\".contains(b)))
}

/// A command encoded as multibulk, or inline when it can be and `inline` says so.
fn encode(args: &[Vec<u8>], inline: bool) -> Vec<u8> {
    if inline && inline_safe(args) {
        let mut line = args.join(&b' ');
        line.extend_from_slice(b"\r\n");
        line
    } else {
        req(args)
    }
}

fn key() -> impl Strategy<Value = Vec<u8>> + Clone {
    prop_oneof![
        4 => (0..6u8).prop_map(|i| format!("k{i}").into_bytes()),
        1 => proptest::collection::vec(any::<u8>(), 0..4),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..24),
        (-5i64..300).prop_map(|n| n.to_string().into_bytes()),
        any::<i64>().prop_map(|n| n.to_string().into_bytes()),
        Just(b"9223372036854775807".to_vec()),
        Just(b"-9223372036854775808".to_vec()),
    ]
}

fn number() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (-3i64..200).prop_map(|n| n.to_string().into_bytes()),
        1 => any::<i64>().prop_map(|n| n.to_string().into_bytes()),
        1 => prop::sample::select(vec![&b"abc"[..], b"", b"01", b"-0", b"1.5", b"9223372036854775808"])
            .prop_map(<[u8]>::to_vec),
    ]
}

fn word(options: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(options).prop_map(|s| s.as_bytes().to_vec())
}

fn v(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// One command, as a list of arguments; the name's case is randomised later.
fn command() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let keys = || proptest::collection::vec(key(), 0..4);
    prop_oneof![
        Just(vec![v("PING")]),
        value().prop_map(|m| vec![v("PING"), m]),
        value().prop_map(|m| vec![v("ECHO"), m]),
        (
            key(),
            value(),
            proptest::collection::vec(
                prop_oneof![
                    word(&["NX", "XX", "GET", "KEEPTTL", "bad"]).prop_map(|w| vec![w]),
                    (word(&["EX", "PX"]), number()).prop_map(|(w, n)| vec![w, n]),
                ],
                0..3,
            )
        )
            .prop_map(|(k, val, opts)| [vec![v("SET"), k, val], opts.concat()].concat()),
        key().prop_map(|k| vec![v("GET"), k]),
        keys().prop_map(|ks| [vec![v("DEL")], ks].concat()),
        keys().prop_map(|ks| [vec![v("EXISTS")], ks].concat()),
        keys().prop_map(|ks| [vec![v("MGET")], ks].concat()),
        proptest::collection::vec(prop_oneof![key(), value()], 0..6).prop_map(|a| [vec![v("MSET")], a].concat()),
        proptest::collection::vec(key(), 0..4).prop_map(|a| [
            vec![v("MSETNX")],
            a.into_iter().flat_map(|k| [k, v("1")]).collect()
        ]
        .concat()),
        key().prop_map(|k| vec![v("INCR"), k]),
        key().prop_map(|k| vec![v("DECR"), k]),
        (key(), number()).prop_map(|(k, n)| vec![v("INCRBY"), k, n]),
        (key(), number()).prop_map(|(k, n)| vec![v("DECRBY"), k, n]),
        (key(), value()).prop_map(|(k, val)| vec![v("APPEND"), k, val]),
        (key(), value()).prop_map(|(k, val)| vec![v("GETSET"), k, val]),
        (key(), value()).prop_map(|(k, val)| vec![v("SETNX"), k, val]),
        (key(), number(), value()).prop_map(|(k, n, val)| vec![v("SETEX"), k, n, val]),
        (key(), number(), value()).prop_map(|(k, n, val)| vec![v("PSETEX"), k, n, val]),
        key().prop_map(|k| vec![v("GETDEL"), k]),
        key().prop_map(|k| vec![v("STRLEN"), k]),
        key().prop_map(|k| vec![v("TYPE"), k]),
        key().prop_map(|k| vec![v("TTL"), k]),
        key().prop_map(|k| vec![v("PTTL"), k]),
        key().prop_map(|k| vec![v("PERSIST"), k]),
        (
            word(&["EXPIRE", "PEXPIRE"]),
            key(),
            number(),
            proptest::collection::vec(word(&["NX", "XX", "GT", "LT", "zz"]), 0..2)
        )
            .prop_map(|(c, k, n, o)| [vec![c, k, n], o].concat()),
        word(&["*", "k?", "k[0-2]", "x*", "\\*"]).prop_map(|p| vec![v("KEYS"), p]),
        Just(vec![v("DBSIZE")]),
        Just(vec![v("FLUSHALL")]),
        number().prop_map(|n| vec![v("SELECT"), n]),
        word(&["save", "appendonly", "*", "nosuch"]).prop_map(|p| vec![v("CONFIG"), v("GET"), p]),
        Just(vec![v("COMMAND"), v("DOCS")]),
        Just(vec![v("COMMAND"), v("COUNT")]),
        Just(vec![v("CLIENT"), v("ID")]),
        value().prop_map(|n| vec![v("CLIENT"), v("SETNAME"), n]),
        Just(vec![v("CLIENT"), v("GETNAME")]),
        number().prop_map(|n| vec![v("HELLO"), n]),
        word(&["keyspace", "stats", "memory"]).prop_map(|s| vec![v("INFO"), s]),
        proptest::collection::vec(value(), 0..3).prop_map(|a| [vec![v("NOSUCH")], a].concat()),
        Just(vec![v("GET")]),
    ]
}

/// A command's bytes, with a randomised name case and encoding.
fn encoded_command() -> impl Strategy<Value = Vec<u8>> {
    (command(), any::<bool>(), any::<u64>(), prop::bool::weighted(0.02)).prop_map(|(mut args, inline, case, quit)| {
        if quit {
            return b"QUIT\r\n".to_vec();
        }
        if let Some(name) = args.first_mut() {
            for (i, b) in name.iter_mut().enumerate() {
                if case >> (i % 64) & 1 == 1 {
                    *b = b.to_ascii_lowercase();
                }
            }
        }
        encode(&args, inline)
    })
}

/// Epochs of commands, each with how far the clock moves before it (in ms).
fn epochs() -> impl Strategy<Value = Vec<(u64, Vec<u8>)>> {
    proptest::collection::vec(
        (prop_oneof![Just(0u64), 0..3_000u64], proptest::collection::vec(encoded_command(), 1..12))
            .prop_map(|(ms, cmds)| (ms, cmds.concat())),
        1..6,
    )
}

/// Feeds each epoch split by `split` and returns (output, last status, store).
fn run(epochs: &[(u64, Vec<u8>)], split: &dyn Fn(&[u8]) -> Vec<Vec<u8>>) -> (Vec<u8>, ConnStatus, Store) {
    let mut store = Store::with_limit(64 * 1024);
    let mut conn = Conn::new();
    let mut out = Vec::new();
    let mut status = ConnStatus::Open;
    let mut now = 5_000_000_000u64;
    for (advance_ms, bytes) in epochs {
        now += advance_ms * 1_000_000;
        for chunk in split(bytes) {
            status = conn.feed(&chunk, &mut store, now, &mut out);
        }
    }
    (out, status, store)
}

fn whole(b: &[u8]) -> Vec<Vec<u8>> {
    vec![b.to_vec()]
}

fn bytewise(b: &[u8]) -> Vec<Vec<u8>> {
    b.iter().map(|&x| vec![x]).collect()
}

fn cut_at(cuts: &[Index]) -> impl Fn(&[u8]) -> Vec<Vec<u8>> + '_ {
    move |b: &[u8]| {
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(b.len() + 1)).collect();
        points.push(0);
        points.push(b.len());
        points.sort_unstable();
        points.windows(2).map(|w| b[w[0]..w[1]].to_vec()).collect()
    }
}

/// Checks that `out` is a sequence of complete, well-formed RESP2 replies.
fn assert_well_formed(mut out: &[u8]) {
    fn line(buf: &[u8]) -> (&[u8], &[u8]) {
        let end = buf.windows(2).position(|w| w == b"\r\n").expect("reply line ends with CRLF");
        (&buf[..end], &buf[end + 2..])
    }
    fn one(buf: &[u8]) -> &[u8] {
        let (kind, rest) = buf.split_first().expect("a reply");
        let (l, rest) = line(rest);
        assert!(!l.contains(&b'\r') && !l.contains(&b'\n'), "{l:?}");
        match kind {
            b'+' | b'-' => rest,
            b':' => {
                std::str::from_utf8(l).unwrap().parse::<i64>().expect("integer reply");
                rest
            }
            b'$' if l == b"-1" => rest,
            b'$' => {
                let n: usize = std::str::from_utf8(l).unwrap().parse().expect("bulk length");
                assert_eq!(&rest[n..n + 2], b"\r\n");
                &rest[n + 2..]
            }
            b'*' => {
                let n: usize = std::str::from_utf8(l).unwrap().parse().expect("array length");
                (0..n).fold(rest, |r, _| one(r))
            }
            other => panic!("bad reply type {other}"),
        }
    }
    while !out.is_empty() {
        out = one(out);
    }
}

/// RESP-shaped garbage: protocol tokens, numbers and noise glued together.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        word(&[
            "*",
            "$",
            "\r\n",
            "\r",
            "\n",
            "-1",
            "0",
            "1",
            "2",
            "3",
            "4",
            "10",
            "*1\r\n",
            "*2\r\n",
            "$3\r\n",
            "$4\r\nPING\r\n",
            "PING",
            "SET",
            "GET",
            "\"",
            "'",
            " ",
            "\\x41",
            "*2000\r\n",
            "$70000\r\n",
            "*-1\r\n",
            "+",
            ":",
            "\0",
            "QUIT\r\n",
            "99999999999999999999999"
        ]),
        proptest::collection::vec(any::<u8>(), 0..8),
        command().prop_map(|a| req(&a)),
    ];
    proptest::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fragmentation_does_not_change_anything(epochs in epochs(), cuts in proptest::collection::vec(any::<Index>(), 0..16)) {
        let (out, status, store) = run(&epochs, &whole);
        assert_well_formed(&out);
        let (out_b, status_b, store_b) = run(&epochs, &bytewise);
        prop_assert_eq!(&out, &out_b);
        prop_assert_eq!(status, status_b);
        prop_assert_eq!(&store, &store_b);
        let (out_c, status_c, store_c) = run(&epochs, &cut_at(&cuts));
        prop_assert_eq!(&out, &out_c);
        prop_assert_eq!(status, status_c);
        prop_assert_eq!(&store, &store_c);
        prop_assert!(store.used_bytes() <= store.limit_bytes());
    }

    #[test]
    fn deleting_every_key_returns_memory_to_zero(epochs in epochs()) {
        let (_, _, mut store) = run(&epochs, &whole);
        let mut conn = Conn::new();
        let mut out = Vec::new();
        // Every key the generator can make: k0..k5 and all byte strings of length < 4 would
        // be too many, so remove expired keys first and then whatever KEYS lists.
        conn.feed(&req(&[v("KEYS"), v("*")]), &mut store, u64::MAX / 2, &mut out);
        let keys = parse_key_list(&out);
        out.clear();
        let mut del = vec![v("DEL")];
        del.extend(keys);
        if del.len() > 1 {
            conn.feed(&req(&del), &mut store, u64::MAX / 2, &mut out);
        }
        prop_assert_eq!(store.stored_keys(), 0);
        prop_assert_eq!(store.used_bytes(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(any::<Index>(), 0..16)) {
        let epochs = vec![(0, input)];
        let (out, status, store) = run(&epochs, &whole);
        assert_well_formed(&out);
        let (out_c, status_c, store_c) = run(&epochs, &cut_at(&cuts));
        prop_assert_eq!(out, out_c);
        prop_assert_eq!(status, status_c);
        prop_assert_eq!(store, store_c);
    }

    #[test]
    fn resp_shaped_garbage_never_panics(input in garbage(), cuts in proptest::collection::vec(any::<Index>(), 0..16)) {
        let epochs = vec![(0, input)];
        let (out, status, store) = run(&epochs, &whole);
        assert_well_formed(&out);
        let (out_b, status_b, store_b) = run(&epochs, &bytewise);
        prop_assert_eq!(&out, &out_b);
        prop_assert_eq!(status, status_b);
        prop_assert_eq!(&store, &store_b);
        let (out_c, status_c, _) = run(&epochs, &cut_at(&cuts));
        prop_assert_eq!(out, out_c);
        prop_assert_eq!(status, status_c);
    }
}

/// The keys in a KEYS reply.
fn parse_key_list(out: &[u8]) -> Vec<Vec<u8>> {
    let text = out;
    let mut keys = Vec::new();
    let (header, mut rest) = text.split_at(text.windows(2).position(|w| w == b"\r\n").unwrap() + 2);
    let n: usize = std::str::from_utf8(&header[1..header.len() - 2]).unwrap().parse().unwrap();
    for _ in 0..n {
        let end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let len: usize = std::str::from_utf8(&rest[1..end]).unwrap().parse().unwrap();
        keys.push(rest[end + 2..end + 2 + len].to_vec());
        rest = &rest[end + 4 + len..];
    }
    keys
}
