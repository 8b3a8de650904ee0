//! The Lua scripts: one per operation, each atomic on the server, timed by the server's `TIME`.
//!
//! A record is one string key, expiring at the record's `expires_at` (`PXAT`), so Redis reclaims
//! the memory. Its value is `1|st|tok|lu|cr|ex|at|fp|ca|out`: version, state (`0` in progress,
//! `1` completed, `n` fresh, `c` completed fresh), token, lease until, created, expires,
//! attempts, fingerprint (hex), completed at, then the outcome bytes.
//!
//! The common path keeps lengths instead of times, so it needs neither `TIME` nor number
//! formatting on the server. A fresh claim is written by the client itself with one
//! `SET … NX PX` (no script): its record (`n`) stores the lease and retention lengths. Its
//! completion (`c`) stores the time from the claim in `lu` and the retention in `ex`, and sets
//! the key to expire after the retention. The prelude's `load` turns both into times from the
//! key's remaining TTL.

/// Shared prelude: `now` from the server clock, and the record codec.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function load(key)
  local v = redis.call('GET', key)
  if not v then return nil end
  local f, pos = {}, 1
  for i = 1, 9 do
    local j = string.find(v, '|', pos, true)
    if not j then return redis.error_reply('idemgate: damaged record at ' .. key) end
    f[i] = string.sub(v, pos, j - 1)
    pos = j + 1
  end
  local r = {st = f[2], tok = tonumber(f[3]), lu = tonumber(f[4]), cr = tonumber(f[5]),
             ex = tonumber(f[6]), at = tonumber(f[7]), fp = f[8], ca = tonumber(f[9]),
             out = string.sub(v, pos)}
  if r.st == 'n' then
    local lease, ret = r.lu, r.ex
    r.ex = now + redis.call('PTTL', key)
    r.lu = r.ex - ret
    r.cr = r.lu - lease
    r.st = '0'
  elseif r.st == 'c' then
    local run, ret = r.lu, r.ex
    r.ex = now + redis.call('PTTL', key)
    r.ca = r.ex - ret
    r.cr = r.ca - run
    r.lu = nil
    r.st = '1'
  end
  return r
end
local function num(x)
  if x == nil then return '' end
  return string.format('%.0f', x)
end
local function save(key, r)
  local v = table.concat({'1', r.st, num(r.tok), num(r.lu), num(r.cr), num(r.ex), num(r.at), r.fp, num(r.ca)}, '|')
  redis.call('SET', key, v .. '|' .. r.out, 'PXAT', num(r.ex))
end
local function fields(r)
  local fp = false
  if r.fp ~= '' then fp = r.fp end
  return {fp, tonumber(r.st), r.tok, r.lu or false, r.out, r.ca or false, r.cr, r.ex, r.at}
end
"#;

/// KEYS[1] record; ARGV fp hex ('' for none), lease ms, retention ms. Called when the client's
/// `SET NX` found the key taken.
/// Replies {1, token, attempts, lease_until} | {2, fields...} | {3, fp} | {4, lease_until, attempts}.
pub(crate) fn claim() -> String {
    let script = format!(
        "{PRELUDE}{}",
        r#"
local key, fp = KEYS[1], ARGV[1]
local lease, ret = tonumber(ARGV[2]), tonumber(ARGV[3])
local r = load(key)
if not r or r.ex <= now then
  -- a new record: its token starts at the server's millisecond clock times TOKENS_PER_MS,
  -- above every token an earlier record of this key can have reached
  local tok = now * TOKENS_PER_MS
  if r and r.tok >= tok then tok = r.tok + 1 end
  local n = {st = '0', tok = tok, lu = now + lease, cr = now, at = 1, fp = fp, out = ''}
  n.ex = n.lu + ret
  save(key, n)
  return {1, n.tok, 1, n.lu}
end
if r.fp ~= '' and fp ~= '' and r.fp ~= fp then return {3, r.fp} end
if r.st == '1' then
  local f = fields(r)
  return {2, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9]}
end
if r.lu > now then return {4, r.lu, r.at} end
r.tok = r.tok + 1
r.at = r.at + 1
r.lu = now + lease
r.ex = r.lu + ret
if r.fp == '' then r.fp = fp end
save(key, r)
return {1, r.tok, r.at, r.lu}
"#
    );
    script.replace(
        "TOKENS_PER_MS",
        itoa::Buffer::new().format(idemgate_core::backend::TOKENS_PER_MS),
    )
}

/// The guard every fenced script starts with: the record must be in progress under ARGV[1].
const HELD: &str = r#"
local key = KEYS[1]
local r = load(key)
if not r or r.st ~= '0' or r.tok ~= tonumber(ARGV[1]) then return -1 end
"#;

/// KEYS[1]; ARGV token, outcome, retention ms. Replies 1 or -1 (lease lost).
///
/// The hot path of every handled message, so it does not go through the prelude's full decode
/// and re-encode: one pattern match, the unchanged fields (token, attempts, fingerprint) copied
/// as they are. A fresh record's completion keeps lengths (`c`): the time since the claim, from
/// the key's TTL, and the retention, as the key's new TTL.
pub(crate) fn complete() -> String {
    r#"
local key = KEYS[1]
local v = redis.call('GET', key)
if not v then return -1 end
local st, tok, lu, cr, ex, at, fp = string.match(v,
  '^1|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|')
if tok ~= ARGV[1] then return -1 end
if st == 'n' then
  local run = tonumber(lu) + tonumber(ex) - redis.call('PTTL', key)
  redis.call('SET', key, table.concat({'1', 'c', tok, run, '', ARGV[3], at, fp, '', ARGV[2]}, '|'),
    'PX', ARGV[3])
  return 1
end
if st ~= '0' then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exs = string.format('%.0f', now + tonumber(ARGV[3]))
redis.call('SET', key, table.concat({'1', '1', tok, '', cr, exs, at, fp,
  string.format('%.0f', now), ARGV[2]}, '|'), 'PXAT', exs)
return 1
"#
    .to_owned()
}

/// KEYS[1]; ARGV token. Replies 1 or -1.
pub(crate) fn release() -> String {
    format!(
        "{PRELUDE}{HELD}{}",
        r#"
if r.lu > now then r.lu = now end
r.fp = ''
save(key, r)
return 1
"#
    )
}

/// KEYS[1]; ARGV token, extend ms. Replies the new lease_until, or -1.
pub(crate) fn renew() -> String {
    format!(
        "{PRELUDE}{HELD}{}",
        r#"
local lu = now + tonumber(ARGV[2])
r.ex = math.max(r.ex, lu + (r.ex - r.lu))
r.lu = lu
save(key, r)
return lu
"#
    )
}

/// KEYS[1]. Replies the fields, or nil when absent or expired.
pub(crate) fn get() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local r = load(KEYS[1])
if not r or r.ex <= now then return false end
return fields(r)
"#
    )
}

/// KEYS[1]; ARGV force ('1' or '0'). Replies {0} absent | {1, token} removed | {2, token} tombstoned |
/// {3, lease_until} held.
pub(crate) fn forget() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local key = KEYS[1]
local r = load(key)
if not r or r.ex <= now then return {0} end
if r.st == '0' and r.lu > now and ARGV[1] ~= '1' then return {3, r.lu} end
-- a tombstone: in progress, lease over, no outcome, the token past every lease handed out
local done = r.st == '1'
if done or r.lu > now then r.lu = now end
r.st, r.tok, r.fp, r.out, r.ca = '0', r.tok + 1, '', '', nil
save(key, r)
if done then return {1, r.tok} end
return {2, r.tok}
"#
    )
}
