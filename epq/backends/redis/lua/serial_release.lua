-- Let the next job of a serial key go (epq.serial): if the job heads the key's sequence, drop
-- it, and put the held message of the job after it into the schedule, due when it was to be;
-- or, with a lease end (ARGV[3] > 0) and that job due (by ARGV[4], now), claimed for the caller
-- to publish (as schedule_claim.lua claims: a caller that dies leaves it to a promoter when the
-- lease ends). With ARGV[2] '1' (a job cancelled before its turn), a job that is not the head
-- leaves the sequence too, its held message dropped.
-- KEYS: sequence, held, schedule, data, claimed; ARGV: job id, '1' to withdraw a job from
-- anywhere, lease end ms (0: none), now ms.
-- Returns {} when the job was not the head, {1} when it was, {1, entry id, message} when the
-- next job's message was claimed.
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then
  if ARGV[2] == '1' then
    redis.call('LREM', KEYS[1], 0, ARGV[1])
    redis.call('HDEL', KEYS[2], ARGV[1])
  end
  return {}
end
redis.call('LPOP', KEYS[1])
local nxt = redis.call('LINDEX', KEYS[1], 0)
if not nxt then return {1} end
local held = redis.call('HGET', KEYS[2], nxt)
if not held then return {1} end
redis.call('HDEL', KEYS[2], nxt)
local a = string.find(held, '|', 1, true)
local b = string.find(held, '|', a + 1, true)
local due, entry, message = string.sub(held, 1, a - 1), string.sub(held, a + 1, b - 1), string.sub(held, b + 1)
if redis.call('HSETNX', KEYS[4], entry, message) == 0 then return {1} end
if tonumber(ARGV[3]) > 0 and tonumber(due) <= tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[5], ARGV[3], entry)
  return {1, entry, message}
end
redis.call('ZADD', KEYS[3], due, entry)
return {1}
