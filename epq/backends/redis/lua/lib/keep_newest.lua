-- #include lib/counter.lua
-- #include lib/index.lua
-- keep_newest: the bound of a history index (`index`: job ids by time). When it holds more than
-- `max` ids, forget the oldest: the records (`prefix` .. id) still in `state`, with their counts
-- and listings.
-- Ids whose record has expired or moved on are dropped from the index on the way. Called after a
-- script's last write to its record (the record it wrote may be among those forgotten).
local function keep_newest(index, stats, max, prefix, state)
  local excess = redis.call('ZCARD', index) - tonumber(max)
  if excess <= 0 then return end
  local oldest = redis.call('ZPOPMIN', index, excess)
  for i = 1, #oldest, 2 do
    local key = prefix .. oldest[i]
    if redis.call('HGET', key, 'state') == state then
      redis.call('HINCRBY', stats, record_counter(key, state), -1)
      index_record(stats, key, oldest[i], 'ZREM')
      redis.call('DEL', key)
    end
  end
end
