-- lane_of: the priority lane of an encoded message, as epq.priority.lane_of: its priority option
-- (epq.options.PRIORITY) when that is 1..4, else the default lane.
local function lane_of(data)
  local ok, message = pcall(cjson.decode, data)
  if ok and type(message) == 'table' and type(message['options']) == 'table' then
    local p = message['options']['@PRIORITY_OPTION@']
    if type(p) == 'number' and p >= 1 and p <= 4 and p == math.floor(p) then return p end
  end
  return @DEFAULT_LANE@
end
