-- Add the message of a job with a serial key to the schedule at its turn (epq.serial): a job
-- that is not in the key's sequence joins its end; the head's message goes into the schedule
-- (once per entry id, as schedule_add.lua), any other's waits held, not due, until its job
-- becomes the head (serial_release.lua).
-- KEYS: sequence, held, schedule, data; ARGV: job id, entry id, message, due ms.
-- Returns 1 when scheduled, 0 when held.
local job = ARGV[1]
local head = redis.call('LINDEX', KEYS[1], 0)
if not head then
  redis.call('RPUSH', KEYS[1], job)
  head = job
elseif head ~= job and not redis.call('LPOS', KEYS[1], job) then
  redis.call('RPUSH', KEYS[1], job)
end
if head ~= job then
  redis.call('HSET', KEYS[2], job, ARGV[4] .. '|' .. ARGV[2] .. '|' .. ARGV[3])
  return 0
end
if redis.call('HSETNX', KEYS[4], ARGV[2], ARGV[3]) == 1 then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
end
return 1
