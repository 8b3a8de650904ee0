//! The Lua scripts: one per operation, each atomic on the server, timed by the server's `TIME`.
//!
//! A record is one hash (fields `fp st tok lu out ca cr ex at`, the `RecordRow` columns) whose
//! key expires at the record's `expires_at` (`PEXPIREAT`), so Redis reclaims the memory.

/// Shared prelude: `now` in milliseconds from the server clock.
const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// KEYS[1] record; ARGV fp ('' for none), lease ms, retention ms.
/// Replies {1, token, attempts, lease_until} | {2, fields...} | {3, fp} | {4, lease_until, attempts}.
pub(crate) fn claim() -> String {
    format!(
        "{NOW}{}",
        r#"
local key, fp = KEYS[1], ARGV[1]
local lease, ret = tonumber(ARGV[2]), tonumber(ARGV[3])
local r = redis.call('HMGET', key, 'fp', 'st', 'tok', 'lu', 'out', 'ca', 'cr', 'ex', 'at')
local function acquire(token, attempts, created, newfp)
  local lu = now + lease
  local ex = lu + ret
  local fields = {'st', 0, 'tok', token, 'lu', lu, 'cr', created, 'ex', ex, 'at', attempts}
  if newfp and newfp ~= '' then
    fields[#fields + 1] = 'fp'
    fields[#fields + 1] = newfp
  end
  redis.call('HSET', key, unpack(fields))
  -- a new key has nothing to clear; an old record drops its outcome (and fingerprint if none)
  if r[2] then
    if newfp and newfp ~= '' then redis.call('HDEL', key, 'out', 'ca') else redis.call('HDEL', key, 'out', 'ca', 'fp') end
  end
  redis.call('PEXPIREAT', key, ex)
  return {1, token, attempts, lu}
end
if not r[2] or tonumber(r[8]) <= now then
  -- a new record: its token starts at the server's millisecond clock, above every token an
  -- earlier record of this key can have reached (one take-over per lease, each lease >= 1 ms)
  local token = now
  if r[3] and tonumber(r[3]) >= token then token = tonumber(r[3]) + 1 end
  return acquire(token, 1, now, fp)
end
if r[1] and fp ~= '' and r[1] ~= fp then return {3, r[1]} end
if r[2] == '1' then return {2, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]} end
if tonumber(r[4]) > now then return {4, tonumber(r[4]), tonumber(r[9])} end
return acquire(tonumber(r[3]) + 1, tonumber(r[9]) + 1, tonumber(r[7]), r[1] or fp)
"#
    )
}

/// The guard every fenced script starts with: the record must be in progress under ARGV[1].
const HELD: &str = r#"
local key = KEYS[1]
local r = redis.call('HMGET', key, 'st', 'tok', 'lu', 'ex')
if r[1] ~= '0' or tonumber(r[2]) ~= tonumber(ARGV[1]) then return -1 end
"#;

/// KEYS[1]; ARGV token, outcome, retention ms. Replies 1 or -1 (lease lost).
pub(crate) fn complete() -> String {
    format!(
        "{NOW}{HELD}{}",
        r#"
local ex = now + tonumber(ARGV[3])
redis.call('HSET', key, 'st', 1, 'out', ARGV[2], 'ca', now, 'ex', ex)
redis.call('HDEL', key, 'lu')
redis.call('PEXPIREAT', key, ex)
return 1
"#
    )
}

/// KEYS[1]; ARGV token. Replies 1 or -1.
pub(crate) fn release() -> String {
    format!(
        "{NOW}{HELD}{}",
        r#"
if tonumber(r[3]) > now then redis.call('HSET', key, 'lu', now) end
return 1
"#
    )
}

/// KEYS[1]; ARGV token, extend ms. Replies the new lease_until, or -1.
pub(crate) fn renew() -> String {
    format!(
        "{NOW}{HELD}{}",
        r#"
local lu = now + tonumber(ARGV[2])
local ex = math.max(tonumber(r[4]), lu + (tonumber(r[4]) - tonumber(r[3])))
redis.call('HSET', key, 'lu', lu, 'ex', ex)
redis.call('PEXPIREAT', key, ex)
return lu
"#
    )
}

/// KEYS[1]. Replies the fields, or nil when absent or expired.
pub(crate) fn get() -> String {
    format!(
        "{NOW}{}",
        r#"
local r = redis.call('HMGET', KEYS[1], 'fp', 'st', 'tok', 'lu', 'out', 'ca', 'cr', 'ex', 'at')
if not r[2] or tonumber(r[8]) <= now then return false end
return r
"#
    )
}
