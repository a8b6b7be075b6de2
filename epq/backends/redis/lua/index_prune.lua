-- Drop from a listing index (lib/index.lua) the positions of records that are gone (expired, or a
-- deleted job's tombstone), looking at the oldest ones: records mostly expire oldest first.
-- KEYS: the index; ARGV: job record key prefix, how many positions to look at at most.
-- Returns how many were dropped.
local positions = redis.call('ZRANGEBYLEX', KEYS[1], '-', '+', 'LIMIT', 0, tonumber(ARGV[2]))
local gone = {}
for _, position in ipairs(positions) do
  if not redis.call('HGET', ARGV[1] .. string.sub(position, 15), 'kind') then gone[#gone + 1] = position end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return #gone
