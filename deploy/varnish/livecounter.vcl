# Varnish 7 (Debian 12's 7.1) in front of livecounter: caches the counters' values and the GRIP
# hold answers Pushpin gets, purged by livecounter on every change. livecounter must run with
# `--purge-url http://127.0.0.1:6081/` (this Varnish): without it every answer says no-cache and
# Varnish caches nothing. The chain with Pushpin: browsers -> Pushpin -> Varnish -> livecounter
# (deploy/pushpin/routes.varnish). Checked by tests/test_varnish.py against a private varnishd.
vcl 4.1;

import std;

backend livecounter {
    .host = "127.0.0.1";
    .port = "8080";
}

# Who may PURGE: livecounter, on this machine.
acl purge {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.method == "PURGE") {
        if (client.ip !~ purge) {
            return (synth(405, "PURGE is for livecounter only"));
        }
        # Every variant (plain, JSON, GRIP hold) of the URL goes: they share its hash (vcl_hash).
        return (purge);
    }
    # Varnish appends the client's address to X-Forwarded-For; when a proxy here (Pushpin) named
    # the browser already, ours would hide it from livecounter's --trust-proxy (it takes the last).
    if (client.ip ~ purge && req.http.X-Forwarded-For ~ ",") {  # the acl: this machine
        set req.http.X-Forwarded-For = regsub(req.http.X-Forwarded-For, "\s*,[^,]*$", "");
    }
    if (req.url !~ "^/counters/") {
        return (pass);  # the page, embed.js, /healthz, /metrics: livecounter's own answers, uncached
    }
    if (req.method != "GET" && req.method != "HEAD") {
        # POST, PUT, DELETE, OPTIONS (and anything else): to livecounter, body and all, never cached.
        return (pass);
    }
    # livecounter answers with the first of these three types that Accept names, else plain text,
    # and says Vary: Accept. One value per answer keeps the variants at three, whatever browsers send.
    std.collect(req.http.Accept);
    if (req.http.Accept ~ "(?i)^(.*?,)??\s*(text/event-stream|application/json|text/plain)\s*(;[^,]*)?(,.*)?$") {
        set req.http.Accept = std.tolower(regsub(req.http.Accept,
            "(?i)^(.*?,)??\s*(text/event-stream|application/json|text/plain)\s*(;[^,]*)?(,.*)?$", "\2"));
    } else {
        set req.http.Accept = "text/plain";
    }
    if (req.http.Accept == "text/event-stream" && !req.http.Grip-Sig) {
        # A direct stream (not through Pushpin): it lives as long as the browser watches. Piped,
        # Varnish copies the bytes as they come, one thread a stream, and only pipe_timeout (60 s
        # idle) applies: livecounter's keep-alive comment (15 s) comes sooner. Passed (do_stream) it
        # is live too, but send_timeout (600 s in all) cuts it off mid-chunk, and it takes two threads.
        return (pipe);
    }
    if (req.url ~ "\?") {
        # ?after= (Pushpin's next link, which must see the latest value), ?ids= (multi-counter
        # streams) and anything else with a query: livecounter purges only the bare URL.
        return (pass);
    }
    if (req.url ~ "%") {
        return (pass);  # an encoded id is another URL here, the same counter to livecounter: never purged
    }
    # A read of a counter (or its watcher count): the same for everyone. The built-in vcl_recv would
    # pass a request with a cookie or Authorization; livecounter's reads use neither.
    unset req.http.Cookie;
    unset req.http.Authorization;
    return (hash);
}

sub vcl_hash {
    # The URL alone, not the Host: livecounter purges http://127.0.0.1:6081/counters/2/ with its own
    # Host, while browsers' requests carry the site's. /counters/2 is /counters/2/ to livecounter.
    hash_data(regsub(req.url, "^(/counters/[^/?]+(/watchers)?)$", "\1/"));
    return (lookup);
}

# vcl_backend_response is the built-in: s-maxage (livecounter's, with --purge-url) sets the TTL;
# no-cache (streams, errors, livecounter without --purge-url) makes a hit-for-miss; no Set-Cookie
# ever comes. livecounter's Vary is Accept alone: GRIP hold answers are looked up only for requests
# with Grip-Sig (direct streams are piped), so Grip-Sig, new in every Pushpin request, is no variant.
