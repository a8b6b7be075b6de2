-- Walk a listing index (lib/index.lua) for the jobs whose records match every filter.
-- KEYS: the index; ARGV: job record key prefix, '1' newest first (else oldest first), the position
-- to start after ('' from the start), how many jobs to find, how many positions to look at at most,
-- then field, value pairs every record must have.
-- Returns {where the walk stopped, id, id, ...}: where it stopped is the last position looked at
-- when it may go on ('' when the index has nothing after it). Positions of records that are gone
-- (expired, or a deleted job's tombstone) are dropped from the index on the way.
local prefix, newest, after = ARGV[1], ARGV[2] == '1', ARGV[3]
local want, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local names, values = {'kind'}, {}
for i = 6, #ARGV, 2 do
  names[#names + 1] = ARGV[i]
  values[#values + 1] = ARGV[i + 1]
end
local range = newest and 'ZREVRANGEBYLEX' or 'ZRANGEBYLEX'
local from = after ~= '' and ('(' .. after) or (newest and '+' or '-')
local to = newest and '-' or '+'
local out, gone, looked, last = {''}, {}, 0, nil
while #out - 1 < want and looked < budget do
  local batch = redis.call(range, KEYS[1], from, to, 'LIMIT', 0, math.min(200, budget - looked))
  if #batch == 0 then
    last = nil
    break
  end
  for _, position in ipairs(batch) do
    looked = looked + 1
    last = position
    local id = string.sub(position, 15)
    local f = redis.call('HMGET', prefix .. id, unpack(names))
    if not f[1] then
      gone[#gone + 1] = position
    else
      local match = true
      for j = 1, #values do
        if f[j + 1] ~= values[j] then
          match = false
          break
        end
      end
      if match then
        out[#out + 1] = id
        if #out - 1 == want then break end
      end
    end
  end
  from = '(' .. last
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
if last and #redis.call(range, KEYS[1], '(' .. last, to, 'LIMIT', 0, 1) > 0 then out[1] = last end
return out
