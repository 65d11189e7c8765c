//! The command table and the commands.
//!
//! Dispatch follows `processCommand` in Redis 7.0's `src/server.c`: QUIT first; then the
//! command lookup (case-insensitive, with `CONFIG GET`-style subcommands); then the arity
//! check; then the out-of-memory check for commands that can grow the store; then the
//! command. Each step's error text is Redis's. The commands follow `src/t_string.c`,
//! `src/db.c`, `src/expire.c` and friends, including the order in which they check their
//! arguments, since that order decides which error a bad request gets.

use alloc::vec::Vec;

use crate::glob;
use crate::int::{parse_i64, usize_to_i64, usize_to_u64, write_u64};
use crate::limits::{ENTRY_OVERHEAD, EXPIRY_OVERHEAD, MAX_BULK_LEN, MAX_REPLY_BYTES};
use crate::reply::{self, errs};
use crate::store::{Nanos, Store};

const NS_PER_MS: u64 = 1_000_000;

/// Per-connection client state that commands read or change.
#[derive(Debug, Default)]
pub(crate) struct Client {
    /// Assigned by the store on the first feed; 0 until then.
    pub(crate) id: u64,
    pub(crate) name: Option<Vec<u8>>,
    /// Set by QUIT: reply, then close.
    pub(crate) close_after_reply: bool,
    /// Set by SHUTDOWN: the guest powers off.
    pub(crate) shutdown: bool,
}

/// What a command runs with.
pub(crate) struct Ctx<'a> {
    pub(crate) store: &'a mut Store,
    pub(crate) now: Nanos,
    pub(crate) out: &'a mut Vec<u8>,
    pub(crate) client: &'a mut Client,
}

impl Ctx<'_> {
    fn ok(&mut self) {
        reply::ok(self.out);
    }
    fn err(&mut self, text: &[u8]) {
        reply::error(self.out, text);
    }
    fn int(&mut self, n: i64) {
        reply::int(self.out, n);
    }
    /// The guest clock in whole milliseconds: Redis's `mstime()` for expiry arithmetic.
    fn now_ms(&self) -> i64 {
        i64::try_from(self.now / NS_PER_MS).unwrap_or(i64::MAX)
    }
}

type Handler = fn(&mut Ctx<'_>, &[Vec<u8>]);

const WRITE: u8 = 1;
const READONLY: u8 = 2;
const DENYOOM: u8 = 4;
const FAST: u8 = 8;
const FLAG_NAMES: [(u8, &[u8]); 4] =
    [(WRITE, b"write"), (READONLY, b"readonly"), (DENYOOM, b"denyoom"), (FAST, b"fast")];

/// A command, as Redis's command table describes it.
struct Spec {
    /// Lowercase, as COMMAND reports it.
    name: &'static str,
    /// `n`: exactly n arguments (name included); `-n`: at least n.
    arity: i32,
    flags: u8,
    /// First key, last key, step (COMMAND INFO).
    keys: (i8, i8, i8),
    run: Handler,
    subcommands: &'static [Spec],
}

const fn cmd(name: &'static str, arity: i32, flags: u8, keys: (i8, i8, i8), run: Handler) -> Spec {
    Spec { name, arity, flags, keys, run, subcommands: &[] }
}

const NOKEYS: (i8, i8, i8) = (0, 0, 0);
const KEY1: (i8, i8, i8) = (1, 1, 1);
const ALLKEYS: (i8, i8, i8) = (1, -1, 1);

static COMMANDS: &[Spec] = &[
    cmd("append", 3, WRITE | DENYOOM | FAST, KEY1, append),
    cmd("auth", -2, FAST, NOKEYS, auth),
    Spec {
        name: "client",
        arity: -2,
        flags: 0,
        keys: NOKEYS,
        run: container_help,
        subcommands: &[
            cmd("getname", 2, 0, NOKEYS, client_getname),
            cmd("help", 2, 0, NOKEYS, container_help),
            cmd("id", 2, 0, NOKEYS, client_id),
            cmd("setinfo", 4, 0, NOKEYS, client_setinfo),
            cmd("setname", 3, 0, NOKEYS, client_setname),
        ],
    },
    // No DOCS subcommand, on purpose: redis-cli 7 asks `COMMAND DOCS` on start, and when the
    // reply is an error (as from Redis 6) it uses the help compiled into it, so `help set`
    // and the argument hints work; an empty reply would leave it with no help at all.
    Spec {
        name: "command",
        arity: -1,
        flags: 0,
        keys: NOKEYS,
        run: command_all,
        subcommands: &[
            cmd("count", 2, 0, NOKEYS, command_count),
            cmd("help", 2, 0, NOKEYS, container_help),
            cmd("info", -2, 0, NOKEYS, command_info),
            cmd("list", -2, 0, NOKEYS, command_list),
        ],
    },
    Spec {
        name: "config",
        arity: -2,
        flags: 0,
        keys: NOKEYS,
        run: container_help,
        subcommands: &[cmd("get", -3, 0, NOKEYS, config_get), cmd("help", 2, 0, NOKEYS, container_help)],
    },
    cmd("dbsize", 1, READONLY | FAST, NOKEYS, dbsize),
    cmd("decr", 2, WRITE | DENYOOM | FAST, KEY1, decr),
    cmd("decrby", 3, WRITE | DENYOOM | FAST, KEY1, decrby),
    cmd("del", -2, WRITE, ALLKEYS, del),
    cmd("echo", 2, FAST, NOKEYS, echo),
    cmd("exists", -2, READONLY | FAST, ALLKEYS, exists),
    cmd("expire", -3, WRITE | FAST, KEY1, expire),
    cmd("flushall", -1, WRITE, NOKEYS, flush),
    cmd("flushdb", -1, WRITE, NOKEYS, flush),
    cmd("get", 2, READONLY | FAST, KEY1, get),
    cmd("getdel", 2, WRITE | FAST, KEY1, getdel),
    cmd("getset", 3, WRITE | DENYOOM | FAST, KEY1, getset),
    cmd("hello", -1, FAST, NOKEYS, hello),
    cmd("incr", 2, WRITE | DENYOOM | FAST, KEY1, incr),
    cmd("incrby", 3, WRITE | DENYOOM | FAST, KEY1, incrby),
    cmd("info", -1, 0, NOKEYS, info),
    cmd("keys", 2, READONLY, NOKEYS, keys),
    cmd("mget", -2, READONLY | FAST, ALLKEYS, mget),
    cmd("mset", -3, WRITE | DENYOOM, (1, -1, 2), mset),
    cmd("msetnx", -3, WRITE | DENYOOM, (1, -1, 2), msetnx),
    cmd("persist", 2, WRITE | FAST, KEY1, persist),
    cmd("pexpire", -3, WRITE | FAST, KEY1, pexpire),
    cmd("ping", -1, FAST, NOKEYS, ping),
    cmd("psetex", 4, WRITE | DENYOOM, KEY1, psetex),
    cmd("pttl", 2, READONLY | FAST, KEY1, pttl),
    cmd("quit", -1, FAST, NOKEYS, quit),
    cmd("select", 2, FAST, NOKEYS, select),
    cmd("set", -3, WRITE | DENYOOM, KEY1, set),
    cmd("setex", 4, WRITE | DENYOOM, KEY1, setex),
    cmd("setnx", 3, WRITE | DENYOOM | FAST, KEY1, setnx),
    cmd("shutdown", -1, 0, NOKEYS, shutdown),
    cmd("strlen", 2, READONLY | FAST, KEY1, strlen),
    cmd("ttl", 2, READONLY | FAST, KEY1, ttl),
    cmd("type", 2, READONLY | FAST, KEY1, type_),
    cmd("unlink", -2, WRITE | FAST, ALLKEYS, del),
];

fn lookup<'a>(table: &'a [Spec], name: &[u8]) -> Option<&'a Spec> {
    table.iter().find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Argument `i`; the arity check has run, so a missing one only reads as empty.
fn arg(argv: &[Vec<u8>], i: usize) -> &[u8] {
    argv.get(i).map_or(&[], Vec::as_slice)
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// Runs one complete command and appends its reply.
pub(crate) fn execute(argv: &[Vec<u8>], ctx: &mut Ctx<'_>) {
    let name = arg(argv, 0);
    // Redis 7.0 answers QUIT before the lookup, whatever its arguments.
    if eq(name, "quit") {
        quit(ctx, argv);
        return;
    }
    let Some(base) = lookup(COMMANDS, name) else {
        unknown_command(ctx, argv);
        return;
    };
    let spec = match (base.subcommands.is_empty(), argv.get(1)) {
        (false, Some(sub)) => match lookup(base.subcommands, sub) {
            Some(s) => s,
            None => {
                let upper = name.to_ascii_uppercase();
                reply::error_fmt(
                    ctx.out,
                    &[
                        b"unknown subcommand '",
                        reply::c_str_prefix(sub, 128),
                        b"'. Try ",
                        reply::c_str_prefix(&upper, usize::MAX),
                        b" HELP.",
                    ],
                );
                return;
            }
        },
        _ => base,
    };
    let argc = usize_to_i64(argv.len());
    let arity = i64::from(spec.arity);
    if (arity > 0 && arity != argc) || argc < arity.saturating_neg() {
        wrong_args(ctx, if core::ptr::eq(spec, base) { None } else { Some(base) }, spec);
        return;
    }
    if spec.flags & DENYOOM != 0 && ctx.store.would_exceed(growth_bound(argv)) {
        ctx.err(errs::OOM);
        return;
    }
    ctx.store.stats.commands_processed = ctx.store.stats.commands_processed.saturating_add(1);
    (spec.run)(ctx, argv);
}

/// The most a write command can grow the store: every argument stored as a key or value,
/// each key twice (the map and the deadline index), plus per-entry overheads and room for
/// a 20-digit number (INCR on a missing key).
fn growth_bound(argv: &[Vec<u8>]) -> usize {
    let bytes: usize = argv.iter().map(Vec::len).fold(0usize, usize::saturating_add);
    let per_arg = ENTRY_OVERHEAD.saturating_add(EXPIRY_OVERHEAD).saturating_add(20);
    bytes.saturating_mul(2).saturating_add(per_arg.saturating_mul(argv.len()))
}

fn unknown_command(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    // `'%.*s' ` per argument while the list is under 128 bytes, each cut to what is left.
    let mut args: Vec<u8> = Vec::new();
    for a in argv.iter().skip(1) {
        if args.len() >= 128 {
            break;
        }
        let room = 128usize.saturating_sub(args.len());
        args.push(b'\'');
        args.extend_from_slice(reply::c_str_prefix(a, room));
        args.extend_from_slice(b"' ");
    }
    reply::error_fmt(
        ctx.out,
        &[b"unknown command '", reply::c_str_prefix(arg(argv, 0), 128), b"', with args beginning with: ", &args],
    );
}

fn wrong_args(ctx: &mut Ctx<'_>, parent: Option<&Spec>, spec: &Spec) {
    let full: Vec<u8> = match parent {
        Some(p) => [p.name.as_bytes(), b"|", spec.name.as_bytes()].concat(),
        None => spec.name.as_bytes().to_vec(),
    };
    reply::error_fmt(ctx.out, &[b"wrong number of arguments for '", &full, b"' command"]);
}

/// `addReplyErrorArity`: for commands that check their argument count themselves.
fn wrong_args_named(ctx: &mut Ctx<'_>, name: &str) {
    reply::error_fmt(ctx.out, &[b"wrong number of arguments for '", name.as_bytes(), b"' command"]);
}

fn invalid_expire(ctx: &mut Ctx<'_>, name: &str) {
    reply::error_fmt(ctx.out, &[b"invalid expire time in '", name.as_bytes(), b"' command"]);
}

/// `getLongLongFromObjectOrReply`: the integer, or the standard error reply.
fn int_arg(ctx: &mut Ctx<'_>, s: &[u8]) -> Option<i64> {
    let v = parse_i64(s);
    if v.is_none() {
        ctx.err(errs::NOT_INTEGER);
    }
    v
}

// ---------------------------------------------------------------- connection

fn quit(ctx: &mut Ctx<'_>, _argv: &[Vec<u8>]) {
    ctx.ok();
    ctx.client.close_after_reply = true;
}

/// SHUTDOWN [NOSAVE|SAVE]: as Redis, no reply on success; the connection
/// closes and the server (the guest) powers off. Nothing is persisted either
/// way: the keyspace lives in guest memory, which ftvm replicates.
fn shutdown(ctx: &mut Ctx<'_>, _argv: &[Vec<u8>]) {
    ctx.client.close_after_reply = true;
    ctx.client.shutdown = true;
}

fn ping(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    match argv.len() {
        1 => reply::status(ctx.out, b"PONG"),
        2 => reply::bulk(ctx.out, arg(argv, 1)),
        _ => wrong_args_named(ctx, "ping"),
    }
}

fn echo(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    reply::bulk(ctx.out, arg(argv, 1));
}

fn select(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let Some(db) = int_arg(ctx, arg(argv, 1)) else {
        return;
    };
    if i32::try_from(db).is_err() {
        ctx.err(b"value is out of range, value must between -2147483648 and 2147483647");
    } else if db != 0 {
        // One keyspace: database 0.
        ctx.err(b"DB index is out of range");
    } else {
        ctx.ok();
    }
}

fn auth(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    // The guest has no users but Redis's passwordless `default`.
    match argv.len() {
        2 => ctx.err(
            b"AUTH <password> called without any password configured for the default user. \
              Are you sure your configuration is correct?",
        ),
        3 if arg(argv, 1) == b"default" => ctx.ok(),
        3 => ctx.err(b"-WRONGPASS invalid username-password pair or user is disabled."),
        _ => ctx.err(errs::SYNTAX),
    }
}

/// `clientSetNameOrReply`: an empty name clears it; otherwise only `!`..`~`.
fn set_client_name(ctx: &mut Ctx<'_>, name: &[u8]) -> bool {
    if name.is_empty() {
        ctx.client.name = None;
        return true;
    }
    if name.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        ctx.err(b"Client names cannot contain spaces, newlines or special characters.");
        return false;
    }
    ctx.client.name = Some(name.to_vec());
    true
}

fn hello(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let mut next = 1usize;
    if argv.len() >= 2 {
        let Some(ver) = parse_i64(arg(argv, 1)) else {
            ctx.err(b"Protocol version is not an integer or out of range");
            return;
        };
        next = 2;
        // Redis accepts 3 too; this server speaks RESP2 only, and says so as Redis does for
        // versions it does not know.
        if ver != 2 {
            ctx.err(b"-NOPROTO unsupported protocol version");
            return;
        }
    }
    while next < argv.len() {
        let opt = arg(argv, next);
        let more = argv.len().saturating_sub(next).saturating_sub(1);
        if eq(opt, "auth") && more >= 2 {
            if arg(argv, next.saturating_add(1)) != b"default" {
                ctx.err(b"-WRONGPASS invalid username-password pair or user is disabled.");
                return;
            }
            next = next.saturating_add(3);
        } else if eq(opt, "setname") && more >= 1 {
            if !set_client_name(ctx, arg(argv, next.saturating_add(1))) {
                return;
            }
            next = next.saturating_add(2);
        } else {
            reply::error_fmt(ctx.out, &[b"Syntax error in HELLO option '", reply::c_str_prefix(opt, usize::MAX), b"'"]);
            return;
        }
    }
    reply::array(ctx.out, 14);
    for (k, v) in [(&b"server"[..], &b"redis"[..]), (b"version", b"7.0.0")] {
        reply::bulk(ctx.out, k);
        reply::bulk(ctx.out, v);
    }
    reply::bulk(ctx.out, b"proto");
    ctx.int(2);
    reply::bulk(ctx.out, b"id");
    ctx.int(i64::try_from(ctx.client.id).unwrap_or(i64::MAX));
    for (k, v) in [(&b"mode"[..], &b"standalone"[..]), (b"role", b"master")] {
        reply::bulk(ctx.out, k);
        reply::bulk(ctx.out, v);
    }
    reply::bulk(ctx.out, b"modules");
    reply::array(ctx.out, 0);
}

fn client_id(ctx: &mut Ctx<'_>, _argv: &[Vec<u8>]) {
    ctx.int(i64::try_from(ctx.client.id).unwrap_or(i64::MAX));
}

fn client_getname(ctx: &mut Ctx<'_>, _argv: &[Vec<u8>]) {
    reply::bulk_or_nil(ctx.out, ctx.client.name.as_deref());
}

fn client_setname(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    if set_client_name(ctx, arg(argv, 2)) {
        ctx.ok();
    }
}

fn client_setinfo(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    // Redis 7.2's CLIENT SETINFO: newer clients send it on connect. Accepted, not stored.
    let (attr, value) = (arg(argv, 2), arg(argv, 3));
    if !eq(attr, "lib-name") && !eq(attr, "lib-ver") {
        reply::error_fmt(ctx.out, &[b"Unrecognized option '", reply::c_str_prefix(attr, usize::MAX), b"'"]);
    } else if value.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        reply::error_fmt(
            ctx.out,
            &[&attr.to_ascii_lowercase(), b" cannot contain spaces, newlines or special characters."],
        );
    } else {
        ctx.ok();
    }
}

/// HELP of CLIENT, COMMAND and CONFIG (and the bare container name): what this server has.
fn container_help(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let Some(spec) = lookup(COMMANDS, arg(argv, 0)) else {
        return;
    };
    if argv.len() < 2 {
        // The bare container (arity -2 stops CLIENT and CONFIG before here).
        wrong_args(ctx, None, spec);
        return;
    }
    let upper = spec.name.to_ascii_uppercase();
    reply::array(ctx.out, spec.subcommands.len().saturating_add(1));
    let mut line = upper.as_bytes().to_vec();
    line.extend_from_slice(b" <subcommand> [<arg> ...]. Subcommands are:");
    reply::status(ctx.out, &line);
    for sub in spec.subcommands {
        reply::status(ctx.out, &sub.name.to_ascii_uppercase().into_bytes());
    }
}

// ---------------------------------------------------------------- introspection

fn command_entry(out: &mut Vec<u8>, spec: &Spec, parent: Option<&Spec>) {
    reply::array(out, 10);
    match parent {
        Some(p) => reply::bulk(out, &[p.name.as_bytes(), b"|", spec.name.as_bytes()].concat()),
        None => reply::bulk(out, spec.name.as_bytes()),
    }
    reply::int(out, i64::from(spec.arity));
    let flags: Vec<&[u8]> = FLAG_NAMES.iter().filter(|(bit, _)| spec.flags & bit != 0).map(|(_, n)| *n).collect();
    reply::array(out, flags.len());
    for f in flags {
        reply::status(out, f);
    }
    reply::int(out, i64::from(spec.keys.0));
    reply::int(out, i64::from(spec.keys.1));
    reply::int(out, i64::from(spec.keys.2));
    // ACL categories, tips, key specs: not modelled.
    for _ in 0..3 {
        reply::array(out, 0);
    }
    reply::array(out, spec.subcommands.len());
    for sub in spec.subcommands {
        command_entry(out, sub, Some(spec));
    }
}

fn command_all(ctx: &mut Ctx<'_>, _argv: &[Vec<u8>]) {
    reply::array(ctx.out, COMMANDS.len());
    for spec in COMMANDS {
        command_entry(ctx.out, spec, None);
    }
}

fn command_count(ctx: &mut Ctx<'_>, _argv: &[Vec<u8>]) {
    ctx.int(usize_to_i64(COMMANDS.len()));
}

fn command_info(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    if argv.len() == 2 {
        command_all(ctx, argv);
        return;
    }
    reply::array(ctx.out, argv.len().saturating_sub(2));
    for name in argv.iter().skip(2) {
        let mut parts = name.splitn(2, |&b| b == b'|');
        let base = lookup(COMMANDS, parts.next().unwrap_or(&[]));
        let found = match (base, parts.next()) {
            (Some(b), None) => Some((b, None)),
            (Some(b), Some(sub)) => lookup(b.subcommands, sub).map(|s| (s, Some(b))),
            (None, _) => None,
        };
        match found {
            Some((spec, parent)) => command_entry(ctx.out, spec, parent),
            None => reply::nil(ctx.out),
        }
    }
}

fn command_list(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    if argv.len() != 2 {
        ctx.err(errs::SYNTAX);
        return;
    }
    reply::array(ctx.out, COMMANDS.len());
    for spec in COMMANDS {
        reply::bulk(ctx.out, spec.name.as_bytes());
    }
}

fn config_get(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let limit = ctx.store.limit_bytes();
    let maxmemory = if limit == usize::MAX { 0 } else { usize_to_u64(limit) };
    let number = |n: u64| {
        let mut v = Vec::new();
        write_u64(&mut v, n);
        v
    };
    // What a client may ask about. redis-benchmark reads `save` and `appendonly` on start;
    // nothing is ever saved: the state lives in guest memory, replicated by ftvm.
    let params: [(&[u8], Vec<u8>); 6] = [
        (b"save", Vec::new()),
        (b"appendonly", b"no".to_vec()),
        (b"maxmemory", number(maxmemory)),
        (b"maxmemory-policy", b"noeviction".to_vec()),
        (b"databases", b"1".to_vec()),
        (b"proto-max-bulk-len", number(usize_to_u64(MAX_BULK_LEN))),
    ];
    // As `configGetCommand` does: a pattern without glob characters is looked up by name
    // and answered under the name as the client spelled it; a glob is matched against every
    // parameter. Each parameter is reported once, in the order first matched.
    let mut hits: Vec<(&[u8], &[u8])> = Vec::new();
    for pattern in argv.get(2..).unwrap_or(&[]) {
        let is_glob = pattern.iter().any(|b| matches!(b, b'[' | b'*' | b'?'));
        for (name, value) in &params {
            let hit = if is_glob { glob::matches(pattern, name, true) } else { pattern.eq_ignore_ascii_case(name) };
            let reported: &[u8] = if is_glob { name } else { pattern };
            if hit && !hits.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                hits.push((reported, value));
            }
        }
    }
    reply::array(ctx.out, hits.len().saturating_mul(2));
    for (name, value) in hits {
        reply::bulk(ctx.out, name);
        reply::bulk(ctx.out, value);
    }
}

fn info(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let sections: [&str; 5] = ["server", "clients", "memory", "stats", "keyspace"];
    let wanted = |s: &str| {
        argv.len() == 1
            || argv.iter().skip(1).any(|a| eq(a, s) || eq(a, "all") || eq(a, "default") || eq(a, "everything"))
    };
    ctx.store.purge_expired(ctx.now);
    let store = &*ctx.store;
    let mut text: Vec<u8> = Vec::new();
    let field = |text: &mut Vec<u8>, name: &str, value: u64| {
        text.extend_from_slice(name.as_bytes());
        text.push(b':');
        write_u64(text, value);
        text.extend_from_slice(b"\r\n");
    };
    let mut first = true;
    for section in sections {
        if !wanted(section) {
            continue;
        }
        if !first {
            text.extend_from_slice(b"\r\n");
        }
        first = false;
        match section {
            "server" => {
                text.extend_from_slice(
                    b"# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nos:ftvm kvstore guest\r\n",
                );
                field(&mut text, "arch_bits", u64::from(usize::BITS));
                text.extend_from_slice(b"tcp_port:6379\r\n");
            }
            "clients" => {
                // redis-cli --stat reads these two.
                text.extend_from_slice(b"# Clients\r\n");
                field(&mut text, "connected_clients", usize_to_u64(store.connected_clients()));
                text.extend_from_slice(b"blocked_clients:0\r\n");
            }
            "memory" => {
                text.extend_from_slice(b"# Memory\r\n");
                field(&mut text, "used_memory", usize_to_u64(store.used_bytes()));
                let limit = store.limit_bytes();
                field(&mut text, "maxmemory", if limit == usize::MAX { 0 } else { usize_to_u64(limit) });
                text.extend_from_slice(b"maxmemory_policy:noeviction\r\n");
            }
            "stats" => {
                text.extend_from_slice(b"# Stats\r\n");
                let s = store.stats;
                field(&mut text, "total_connections_received", s.connections_received);
                field(&mut text, "total_commands_processed", s.commands_processed);
                field(&mut text, "expired_keys", s.expired_keys);
                field(&mut text, "keyspace_hits", s.keyspace_hits);
                field(&mut text, "keyspace_misses", s.keyspace_misses);
            }
            _ => {
                text.extend_from_slice(b"# Keyspace\r\n");
                if store.stored_keys() > 0 {
                    text.extend_from_slice(b"db0:keys=");
                    write_u64(&mut text, usize_to_u64(store.stored_keys()));
                    text.extend_from_slice(b",expires=");
                    write_u64(&mut text, usize_to_u64(store.keys_with_deadline()));
                    text.extend_from_slice(b",avg_ttl=0\r\n");
                }
            }
        }
    }
    reply::bulk(ctx.out, &text);
}

// ---------------------------------------------------------------- keyspace

fn dbsize(ctx: &mut Ctx<'_>, _argv: &[Vec<u8>]) {
    ctx.store.purge_expired(ctx.now);
    ctx.int(usize_to_i64(ctx.store.stored_keys()));
}

fn flush(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let ok = match argv.len() {
        1 => true,
        2 => eq(arg(argv, 1), "sync") || eq(arg(argv, 1), "async"),
        _ => false,
    };
    if ok {
        ctx.store.flush();
        ctx.ok();
    } else {
        ctx.err(errs::SYNTAX);
    }
}

fn del(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let mut n = 0i64;
    for key in argv.iter().skip(1) {
        // An expired key counts as absent, as Redis's lazy expiry makes it.
        if ctx.store.contains(key, ctx.now) && ctx.store.remove(key) {
            n = n.saturating_add(1);
        }
    }
    ctx.int(n);
}

fn exists(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let mut n = 0i64;
    for key in argv.iter().skip(1) {
        if ctx.store.contains(key, ctx.now) {
            n = n.saturating_add(1);
        }
    }
    ctx.int(n);
}

fn type_(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let found = ctx.store.contains(arg(argv, 1), ctx.now);
    reply::status(ctx.out, if found { b"string" } else { b"none" });
}

fn keys(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    ctx.store.purge_expired(ctx.now);
    let pattern = arg(argv, 1);
    let mut size = 0usize;
    let mut hits: Vec<&[u8]> = Vec::new();
    for key in ctx.store.keys() {
        if glob::matches(pattern, key, false) {
            size = size.saturating_add(reply::bulk_size(key.len()));
            if size > MAX_REPLY_BYTES {
                reply::error(ctx.out, b"reply exceeds the server's reply size limit");
                return;
            }
            hits.push(key);
        }
    }
    reply::array(ctx.out, hits.len());
    for key in hits {
        reply::bulk(ctx.out, key);
    }
}

// ---------------------------------------------------------------- strings

fn get(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let v = ctx.store.lookup_read(arg(argv, 1), ctx.now);
    reply::bulk_or_nil(ctx.out, v);
}

fn getdel(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let key = arg(argv, 1);
    let v = ctx.store.lookup_read(key, ctx.now).map(<[u8]>::to_vec);
    reply::bulk_or_nil(ctx.out, v.as_deref());
    if v.is_some() {
        ctx.store.remove(key);
    }
}

fn getset(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let key = arg(argv, 1);
    let v = ctx.store.lookup_read(key, ctx.now);
    reply::bulk_or_nil(ctx.out, v);
    ctx.store.insert(key, arg(argv, 2).to_vec(), None);
}

fn strlen(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let n = ctx.store.get(arg(argv, 1), ctx.now).map_or(0, <[u8]>::len);
    ctx.int(usize_to_i64(n));
}

fn append(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let (key, extra) = (arg(argv, 1), arg(argv, 2));
    let value = match ctx.store.get(key, ctx.now) {
        None => extra.to_vec(),
        Some(old) => {
            // `checkStringLength`, with this server's bulk limit as proto-max-bulk-len.
            if old.len().saturating_add(extra.len()) > MAX_BULK_LEN {
                ctx.err(b"string exceeds maximum allowed size (proto-max-bulk-len)");
                return;
            }
            [old, extra].concat()
        }
    };
    let len = value.len();
    ctx.store.update_value(key, value, ctx.now);
    ctx.int(usize_to_i64(len));
}

fn mget(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let keys = argv.get(1..).unwrap_or(&[]);
    let mut size = 0usize;
    for key in keys {
        let len = ctx.store.get(key, ctx.now).map_or(5, |v| reply::bulk_size(v.len()));
        size = size.saturating_add(len);
    }
    if size > MAX_REPLY_BYTES {
        reply::error(ctx.out, b"reply exceeds the server's reply size limit");
        return;
    }
    reply::array(ctx.out, keys.len());
    for key in keys {
        let v = ctx.store.lookup_read(key, ctx.now);
        reply::bulk_or_nil(ctx.out, v);
    }
}

fn mset(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    if argv.len() % 2 == 0 {
        wrong_args_named(ctx, "mset");
        return;
    }
    for pair in argv.get(1..).unwrap_or(&[]).chunks_exact(2) {
        if let [k, v] = pair {
            ctx.store.insert(k, v.clone(), None);
        }
    }
    ctx.ok();
}

fn msetnx(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    if argv.len() % 2 == 0 {
        wrong_args_named(ctx, "msetnx");
        return;
    }
    let pairs = argv.get(1..).unwrap_or(&[]);
    for pair in pairs.chunks_exact(2) {
        if let [k, _] = pair {
            if ctx.store.contains(k, ctx.now) {
                ctx.int(0);
                return;
            }
        }
    }
    for pair in pairs.chunks_exact(2) {
        if let [k, v] = pair {
            ctx.store.insert(k, v.clone(), None);
        }
    }
    ctx.int(1);
}

/// The unit of a relative expiry argument.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    Seconds,
    Millis,
}

/// `getExpireMillisecondsOrReply` for SET/SETEX/PSETEX: a positive relative time whose
/// absolute value in milliseconds fits `i64`; returns the deadline in guest-clock ns.
fn expire_arg(ctx: &mut Ctx<'_>, s: &[u8], unit: Unit, name: &str) -> Option<Nanos> {
    let mut ms = int_arg(ctx, s)?;
    if ms <= 0 || (unit == Unit::Seconds && ms > i64::MAX / 1000) {
        invalid_expire(ctx, name);
        return None;
    }
    if unit == Unit::Seconds {
        ms = ms.saturating_mul(1000);
    }
    if ms.checked_add(ctx.now_ms()).is_none() {
        invalid_expire(ctx, name);
        return None;
    }
    let rel_ns = u64::try_from(ms).unwrap_or(0).saturating_mul(NS_PER_MS);
    Some(ctx.now.saturating_add(rel_ns))
}

fn set(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let (mut nx, mut xx, mut get, mut keepttl) = (false, false, false, false);
    // The expiry option seen last: its unit and argument.
    let mut expire: Option<(Unit, &[u8])> = None;
    let mut j = 3usize;
    while j < argv.len() {
        let opt = arg(argv, j);
        let next = argv.get(j.saturating_add(1));
        if eq(opt, "nx") && !xx {
            nx = true;
        } else if eq(opt, "xx") && !nx {
            xx = true;
        } else if eq(opt, "get") {
            get = true;
        } else if eq(opt, "keepttl") && expire.is_none() {
            keepttl = true;
        } else if let (true, Some(next)) = (eq(opt, "ex") || eq(opt, "px"), next) {
            let unit = if eq(opt, "ex") { Unit::Seconds } else { Unit::Millis };
            // Redis lets EX repeat and PX repeat, but not mix with each other or KEEPTTL.
            if keepttl || expire.is_some_and(|(u, _)| u != unit) {
                ctx.err(errs::SYNTAX);
                return;
            }
            expire = Some((unit, next));
            j = j.saturating_add(1);
        } else if (eq(opt, "exat") || eq(opt, "pxat")) && next.is_some() {
            // Unix timestamps: the guest clock counts from boot, not from the epoch.
            ctx.err(b"EXAT and PXAT are not supported: the server has no wall clock");
            return;
        } else {
            ctx.err(errs::SYNTAX);
            return;
        }
        j = j.saturating_add(1);
    }
    let deadline = match expire {
        Some((unit, s)) => match expire_arg(ctx, s, unit, "set") {
            Some(d) => Some(d),
            None => return,
        },
        None => None,
    };
    let key = arg(argv, 1);
    let old = ctx.store.deadline(key, ctx.now);
    if get {
        let v = ctx.store.lookup_read(key, ctx.now);
        reply::bulk_or_nil(ctx.out, v);
    }
    let found = old.is_some();
    if (nx && found) || (xx && !found) {
        if !get {
            reply::nil(ctx.out);
        }
        return;
    }
    let deadline = if keepttl { old.flatten() } else { deadline };
    ctx.store.insert(key, arg(argv, 2).to_vec(), deadline);
    if !get {
        ctx.ok();
    }
}

fn setnx(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let key = arg(argv, 1);
    if ctx.store.contains(key, ctx.now) {
        ctx.int(0);
    } else {
        ctx.store.insert(key, arg(argv, 2).to_vec(), None);
        ctx.int(1);
    }
}

fn setex_generic(ctx: &mut Ctx<'_>, argv: &[Vec<u8>], unit: Unit, name: &str) {
    let Some(deadline) = expire_arg(ctx, arg(argv, 2), unit, name) else {
        return;
    };
    ctx.store.insert(arg(argv, 1), arg(argv, 3).to_vec(), Some(deadline));
    ctx.ok();
}

fn setex(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    setex_generic(ctx, argv, Unit::Seconds, "setex");
}

fn psetex(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    setex_generic(ctx, argv, Unit::Millis, "psetex");
}

fn incr_decr(ctx: &mut Ctx<'_>, key: &[u8], incr: i64) {
    let old = match ctx.store.get(key, ctx.now) {
        None => 0,
        Some(v) => match parse_i64(v) {
            Some(n) => n,
            None => {
                ctx.err(errs::NOT_INTEGER);
                return;
            }
        },
    };
    let Some(new) = old.checked_add(incr) else {
        ctx.err(errs::OVERFLOW);
        return;
    };
    let mut digits = Vec::new();
    crate::int::write_i64(&mut digits, new);
    ctx.store.update_value(key, digits, ctx.now);
    ctx.int(new);
}

fn incr(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    incr_decr(ctx, arg(argv, 1), 1);
}

fn decr(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    incr_decr(ctx, arg(argv, 1), -1);
}

fn incrby(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let Some(n) = int_arg(ctx, arg(argv, 2)) else {
        return;
    };
    incr_decr(ctx, arg(argv, 1), n);
}

fn decrby(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let Some(n) = int_arg(ctx, arg(argv, 2)) else {
        return;
    };
    let Some(neg) = n.checked_neg() else {
        ctx.err(b"decrement would overflow");
        return;
    };
    incr_decr(ctx, arg(argv, 1), neg);
}

// ---------------------------------------------------------------- expiry

fn ttl_generic(ctx: &mut Ctx<'_>, argv: &[Vec<u8>], unit: Unit) {
    match ctx.store.deadline(arg(argv, 1), ctx.now) {
        None => ctx.int(-2),
        Some(None) => ctx.int(-1),
        Some(Some(t)) => {
            let ms = i64::try_from(t.saturating_sub(ctx.now) / NS_PER_MS).unwrap_or(i64::MAX);
            // Redis rounds TTL to the nearest second.
            let v = if unit == Unit::Millis { ms } else { ms.saturating_add(500) / 1000 };
            ctx.int(v);
        }
    }
}

fn ttl(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    ttl_generic(ctx, argv, Unit::Seconds);
}

fn pttl(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    ttl_generic(ctx, argv, Unit::Millis);
}

fn persist(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    let key = arg(argv, 1);
    if let Some(Some(_)) = ctx.store.deadline(key, ctx.now) {
        ctx.store.set_deadline(key, None);
        ctx.int(1);
    } else {
        ctx.int(0);
    }
}

/// `expireGenericCommand` with a relative time: options, then the number, then the key.
fn expire_generic(ctx: &mut Ctx<'_>, argv: &[Vec<u8>], unit: Unit, name: &str) {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in argv.iter().skip(3) {
        if eq(opt, "nx") {
            nx = true;
        } else if eq(opt, "xx") {
            xx = true;
        } else if eq(opt, "gt") {
            gt = true;
        } else if eq(opt, "lt") {
            lt = true;
        } else {
            reply::error_fmt(ctx.out, &[b"Unsupported option ", reply::c_str_prefix(opt, usize::MAX)]);
            return;
        }
    }
    if nx && (xx || gt || lt) {
        ctx.err(b"NX and XX, GT or LT options at the same time are not compatible");
        return;
    }
    if gt && lt {
        ctx.err(b"GT and LT options at the same time are not compatible");
        return;
    }
    let Some(mut rel_ms) = int_arg(ctx, arg(argv, 2)) else {
        return;
    };
    if unit == Unit::Seconds {
        match rel_ms.checked_mul(1000) {
            Some(ms) if (i64::MIN / 1000..=i64::MAX / 1000).contains(&rel_ms) => rel_ms = ms,
            _ => {
                invalid_expire(ctx, name);
                return;
            }
        }
    }
    if rel_ms > i64::MAX.saturating_sub(ctx.now_ms()) {
        invalid_expire(ctx, name);
        return;
    }
    let key = arg(argv, 1);
    let Some(current) = ctx.store.deadline(key, ctx.now) else {
        ctx.int(0);
        return;
    };
    // Deadlines compared in i128 nanoseconds: the new one may lie in the past.
    let new = i128::from(ctx.now).saturating_add(i128::from(rel_ms).saturating_mul(i128::from(NS_PER_MS)));
    let current_ns = current.map(i128::from);
    let refused = (nx && current.is_some())
        || (xx && current.is_none())
        || (gt && current_ns.is_none_or(|c| new <= c))
        || (lt && current_ns.is_some_and(|c| new >= c));
    if refused {
        ctx.int(0);
        return;
    }
    if new <= i128::from(ctx.now) {
        ctx.store.remove(key);
    } else {
        ctx.store.set_deadline(key, Some(u64::try_from(new).unwrap_or(u64::MAX)));
    }
    ctx.int(1);
}

fn expire(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    expire_generic(ctx, argv, Unit::Seconds, "expire");
}

fn pexpire(ctx: &mut Ctx<'_>, argv: &[Vec<u8>]) {
    expire_generic(ctx, argv, Unit::Millis, "pexpire");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_lowercase_and_unique() {
        for pair in COMMANDS.windows(2) {
            assert!(pair[0].name < pair[1].name, "{} {}", pair[0].name, pair[1].name);
        }
        for spec in COMMANDS {
            assert_eq!(spec.name, spec.name.to_ascii_lowercase());
            for sub in spec.subcommands {
                assert_eq!(sub.name, sub.name.to_ascii_lowercase());
            }
        }
    }
}
