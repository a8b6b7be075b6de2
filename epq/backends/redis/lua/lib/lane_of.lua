-- lane_of: the priority lane of an encoded message, as epq.priority.lane_of: its priority option
-- (epq.options.PRIORITY) when that is 1..4; else its AMQP broker_priority (a plain Dramatiq actor's:
-- 4 and above -> 1 ... 1 and below -> 4, as epq.priority.lane_of_amqp); else the default lane.
local function lane_of(data)
  local ok, message = pcall(cjson.decode, data)
  if ok and type(message) == 'table' and type(message['options']) == 'table' then
    local p = message['options']['@PRIORITY_OPTION@']
    if type(p) == 'number' and p >= 1 and p <= 4 and p == math.floor(p) then return p end
    local b = message['options']['@BROKER_PRIORITY_OPTION@']
    if type(b) == 'number' and b == b and b ~= math.huge and b ~= -math.huge then
      return @MAX_PRIORITY@ + 1 - math.max(1, math.min(@MAX_PRIORITY@, math.floor(b)))
    end
  end
  return @DEFAULT_LANE@
end
