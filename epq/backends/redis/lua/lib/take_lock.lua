-- #include lib/holder_id.lua
-- take_lock: take the uniqueness lock `key` for `holder` (its value) for `ttl` ms, unless another
-- job holds it: then return that holder value. A lock the same job (`id`) holds counts as taken.
local function take_lock(key, holder, ttl, id)
  if redis.call('SET', key, holder, 'NX', 'PX', ttl) then return false end
  local current = redis.call('GET', key)
  if holder_id(current) ~= id then return current end
  return false
end
