-- counter: the name of a record counter in the stats hash, `queue|priority|state`, as
-- epq.backends.base.counter_group makes it; record_counter: the counter of a stored record in a
-- state.
local function counter(queue, priority, state)
  return queue .. '|' .. priority .. '|' .. state
end

local function record_counter(key, state)
  local at = redis.call('HMGET', key, 'queue', 'priority')
  return counter(at[1], at[2], state)
end
