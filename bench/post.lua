-- wrk: POST with no body, as browsers and the docs send an increment
wrk.method = "POST"
