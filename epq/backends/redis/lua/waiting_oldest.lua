-- The due time of the oldest job waiting in a queue|priority's waiting index (see
-- lib/counter.lua), dropping on the way the ids whose record is no longer available (expired, or
-- moved on by a script that does not keep the index).
-- KEYS: the waiting index; ARGV: the job record key prefix. Returns the due time (ms), or false.
for _ = 1, 100 do
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #head == 0 then return false end
  if redis.call('HGET', ARGV[1] .. head[1], 'state') == 'available' then return head[2] end
  redis.call('ZREM', KEYS[1], head[1])
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return head[2] or false
