-- What the worker of a job inserted in uniqueness mode replace or debounce reads once it started
-- it (epq.middleware.modes), in one atomic read: the payload a duplicate put in its record ('' when none
-- did), and the job it follows when that has not ended ('' otherwise: it may run).
-- KEYS: none; ARGV: record key prefix, job id.
local found = redis.call('HMGET', ARGV[1] .. ARGV[2], 'args', 'replaced', 'after')
local args, waits_for = '', ''
if found[2] and found[1] then args = found[1] end
if found[3] then
  local state = redis.call('HGET', ARGV[1] .. found[3], 'state')
  if state and state ~= 'completed' and state ~= 'discarded' and state ~= 'cancelled' then
    waits_for = found[3]
  end
end
return {args, waits_for}
