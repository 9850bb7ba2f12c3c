-- wrk: POSTs spread over COUNT counters named PREFIX0 .. PREFIX<COUNT-1>, each drawn at random
wrk.method = "POST"
local prefix = os.getenv("PREFIX") or "c"
local count = tonumber(os.getenv("COUNT") or "10")

request = function()
    return wrk.format(nil, "/counters/" .. prefix .. math.random(0, count - 1) .. "/")
end
