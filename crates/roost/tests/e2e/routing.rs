//! Host routing: exact names, aliases, wildcards, unknown hosts.

use crate::harness::{get, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_route_to_their_sites_and_unknown_hosts_get_a_plain_404() {
    let node = Node::start().await;
    let app = node.app("tester.py");
    node.add(node.spec("main", &["example.test", "www.example.test"], &app))
        .await;
    node.add(node.spec("wild", &["*.example.test"], &app)).await;
    node.add(node.spec("api", &["*.api.example.test"], &app))
        .await;

    for (host, site) in [
        ("example.test", "main"),
        ("WWW.Example.Test:8080", "main"),
        ("www.example.test.", "main"),
        ("shop.example.test", "wild"),
        ("a.b.example.test", "wild"),
        ("v1.api.example.test", "api"),
    ] {
        let r = get(node.addr, host, "/environ").await.unwrap();
        assert_eq!(r.status, 200, "{host}: {}", r.text());
        let log = node.log(site, "access.log");
        assert!(
            log.contains("/environ") || r.status == 200,
            "{host} went elsewhere"
        );
        let env: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(env["HTTP_HOST"], host, "{host}");
    }
    // Each site saw exactly the requests meant for it.
    node.eventually("access logs to be written", || async {
        node.log("main", "access.log")
            .matches("GET /environ")
            .count()
            == 3
            && node
                .log("wild", "access.log")
                .matches("GET /environ")
                .count()
                == 2
            && node
                .log("api", "access.log")
                .matches("GET /environ")
                .count()
                == 1
    })
    .await;

    for host in ["example.org", "test", "api.example.org"] {
        let r = get(node.addr, host, "/").await.unwrap();
        assert_eq!(r.status, 404, "{host}");
        assert!(r.text().contains("No site is served"), "{}", r.text());
        assert!(!r.text().contains(node.dir.path().to_str().unwrap()));
    }
    node.stop().await;
}
