use super::*;

fn peer() -> SocketAddr {
    "127.0.0.1:9".parse().expect("peer")
}

fn reader() -> Reader {
    Reader::new(1024, 64)
}

#[test]
fn a_request_arrives_in_pieces_and_pipelined_ones_follow() {
    let mut r = reader();
    r.feed(b"POST /api/x?a=1&b=two%20words HTTP/1.1\r\nHost: h\r\nContent-Len");
    assert!(matches!(r.step(peer()), Step::Need));
    assert!(r.in_request());
    r.feed(b"gth: 5\r\n\r\nhel");
    assert!(matches!(r.step(peer()), Step::Need));
    r.feed(b"loGET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    let Step::Request(first) = r.step(peer()) else {
        panic!("first request")
    };
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/api/x");
    assert_eq!(first.param("b"), Some("two words"));
    assert_eq!(first.body, b"hello");
    assert!(first.keep_alive);
    let Step::Request(second) = r.step(peer()) else {
        panic!("second request")
    };
    assert_eq!(second.path, "/");
    assert!(!second.keep_alive);
    assert!(matches!(r.step(peer()), Step::Need));
    assert!(!r.in_request());
}

#[test]
fn limits_and_garbage_fail_with_json_errors() {
    let mut r = reader();
    r.feed(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n");
    let Step::Fail(too_big) = r.step(peer()) else {
        panic!("413")
    };
    assert_eq!(too_big.status, 413);
    assert!(String::from_utf8_lossy(&too_big.body).contains("\"error\""));

    let mut r = reader();
    r.feed(&[b'G'; 2000]);
    let Step::Fail(long) = r.step(peer()) else {
        panic!("431 or 400")
    };
    assert!(long.status == 431 || long.status == 400, "{}", long.status);

    let mut r = reader();
    r.feed(b"\x00\x01garbage\r\n\r\n");
    let Step::Fail(garbage) = r.step(peer()) else {
        panic!("400")
    };
    assert_eq!(garbage.status, 400);

    let mut r = reader();
    r.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    let Step::Fail(chunked) = r.step(peer()) else {
        panic!("411")
    };
    assert_eq!(chunked.status, 411);

    let mut r = reader();
    r.feed(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n");
    assert!(matches!(r.step(peer()), Step::Fail(f) if f.status == 400));
}

#[test]
fn expect_continue_is_answered_once() {
    let mut r = reader();
    r.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
    assert!(matches!(r.step(peer()), Step::Continue));
    assert!(matches!(r.step(peer()), Step::Need));
    r.feed(b"abc");
    assert!(matches!(r.step(peer()), Step::Request(_)));
}

#[test]
fn responses_serialize_and_cannot_inject_headers() {
    let resp = Response::json(200, &serde_json::json!({"ok": true}))
        .with_header("X-Evil", "a\r\nSet-Cookie: x=y");
    let bytes = String::from_utf8(resp.to_bytes(true, false)).expect("utf8");
    assert!(bytes.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(bytes.contains("Content-Length: 11\r\n"));
    assert!(bytes.contains("Connection: keep-alive\r\n"));
    assert!(!bytes.contains("\r\nSet-Cookie"));
    assert!(bytes.ends_with("\r\n\r\n{\"ok\":true}"));
    let head = resp.to_bytes(false, true);
    assert!(String::from_utf8_lossy(&head).ends_with("\r\n\r\n"));
}

#[test]
fn decoding() {
    assert_eq!(percent_decode("a%20b+c%zz%4", true), "a b c%zz%4");
    assert_eq!(percent_decode("a+b", false), "a+b");
    assert_eq!(
        parse_form("token=epx_1%2B2&x"),
        vec![
            ("token".to_owned(), "epx_1+2".to_owned()),
            ("x".to_owned(), String::new())
        ]
    );
}
