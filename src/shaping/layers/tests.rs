use super::*;
use crate::route::Site;

/// The layers of a configuration, with what the tests ask of them.
struct Shaped {
    shaping: Layers,
    sources: usize,
}

impl Shaped {
    fn site_shape(&self, hop: &Hop) -> SiteShape {
        self.shaping.site(hop, self.sources)
    }
}

fn layers(toml: &str) -> Result<Shaped, ConfigError> {
    let cfg = Config::parse(toml).expect("parses");
    let mut sources: Vec<String> = cfg.source.iter().map(|s| s.name.clone()).collect();
    if sources.is_empty() {
        sources.push("default".into());
    }
    Layers::from_config(&cfg, &sources).map(|shaping| Shaped {
        shaping,
        sources: sources.len(),
    })
}

fn settings(toml: &str) -> Shaped {
    layers(toml).expect("valid")
}

fn error(toml: &str) -> String {
    match layers(toml) {
        Ok(_) => panic!("accepted: {toml}"),
        Err(e) => e.to_string(),
    }
}

fn mx(hosts: &[&str]) -> Hop {
    Hop::Mx(Site::new(
        hosts.iter().map(|h| (10, (*h).to_owned())).collect(),
    ))
}

const LAYERED: &str = r#"
    [delivery]
    connections_per_destination_max = 8
    [shaping]
    message_rate = "1000/s"
    [[source]]
    name = "warm"
    address = "127.0.0.2"
    [[source]]
    name = "fresh"
    address = "127.0.0.3"
    message_rate = "50000/h"
    [[provider]]
    name = "bigmail"
    mx = ["*.bigmail.test"]
    connections_max = 4
    message_rate = "100/s"
    [[site]]
    provider = "bigmail"
    idle_timeout_ms = 2500
    [[site]]
    mx = "mx.bigmail.test"
    connections_max = 2
    [[site]]
    provider = "bigmail"
    source = "fresh"
    message_rate = "10/min"
    connections_max = 1
    [[domain]]
    name = "vip.test"
    message_rate = "5/s"
    [[domain]]
    name = "vip.test"
    source = "fresh"
    connections_max = 3
    [[tenant]]
    name = "Acme"
    message_rate = "20/s"
"#;

#[test]
fn layers_resolve_in_documented_order() {
    let s = settings(LAYERED);
    // Defaults only.
    let other = s.site_shape(&mx(&["mx.other.test"]));
    assert_eq!(other.provider, None);
    assert_eq!(other.base.connections_max, 8);
    assert_eq!(other.base.message_rate, Rate::parse("1000/s").ok());
    // Provider, then the first site table without a source (by provider).
    let big = s.site_shape(&mx(&["a.bigmail.test", "b.bigmail.test"]));
    assert_eq!(s.shaping.provider_name(big.provider), "bigmail");
    assert_eq!(big.base.connections_max, 4);
    assert_eq!(big.base.idle_timeout_ms, 2500);
    assert_eq!(big.base.message_rate, Rate::parse("100/s").ok());
    // Source overrides last.
    assert_eq!(big.of(0).connections_max, 4);
    assert_eq!(big.of(1).connections_max, 1);
    assert_eq!(big.of(1).message_rate, Rate::parse("10/min").ok());
    // First matching site table wins: the provider one comes first in the file.
    let one = s.site_shape(&mx(&["mx.bigmail.test"]));
    assert_eq!(one.base.connections_max, 4);
    assert_eq!(one.base.idle_timeout_ms, 2500);
    // A domain with limits is a site of its own, layered over its MX site.
    assert!(s.shaping.has_domain("vip.test") && !s.shaping.has_domain("other.test"));
    let vip = Hop::Mx(Site::new(vec![(10, "a.bigmail.test".into())]).shaped_for("vip.test"));
    assert_ne!(vip, mx(&["a.bigmail.test"]));
    let v = s.site_shape(&vip);
    assert_eq!(v.base.message_rate, Rate::parse("5/s").ok());
    assert_eq!(v.base.connections_max, 4);
    assert_eq!(v.of(1).connections_max, 3);
    assert_eq!(v.of(1).message_rate, Rate::parse("10/min").ok());
    // Per source and per tenant rates.
    assert_eq!(s.shaping.source_rate(0), None);
    assert_eq!(s.shaping.source_rate(1), Rate::parse("50000/h").ok());
    assert_eq!(s.shaping.tenant_rate("ACME"), Rate::parse("20/s").ok());
    assert_eq!(s.shaping.tenant_rate("other"), None);
}

#[test]
fn explain_names_the_layer_of_every_value() {
    let s = settings(LAYERED);
    let (provider, rows) = s
        .shaping
        .explain(&["a.bigmail.test"], Some("vip.test"), Some(1));
    assert_eq!(provider, "bigmail");
    let row = |k: &str| rows.iter().find(|r| r.key == k).expect(k).clone();
    assert_eq!(row("connections_max").value, "3");
    assert_eq!(
        row("connections_max").origin,
        "domain[1] vip.test source fresh"
    );
    assert_eq!(row("message_rate").value, "10/min");
    assert!(row("message_rate").origin.starts_with("site[2]"));
    assert_eq!(row("idle_timeout_ms").origin, "site[0] provider bigmail");
    assert_eq!(row("site_message_rate").value, "unlimited");
    assert_eq!(row("site_message_rate").origin, "default");
}

#[test]
fn builtin_providers_parse_and_can_be_replaced_or_turned_off() {
    let builtin = builtin_providers();
    assert!(builtin.len() >= 5);
    let s = settings("");
    let g = s.site_shape(&mx(&["alt1.aspmx.l.google.com", "aspmx.l.google.com"]));
    assert_eq!(s.shaping.provider_name(g.provider), "google");
    assert_eq!(g.base.connections_max, 20);
    let o = s.site_shape(&mx(&["example-com.mail.protection.outlook.com"]));
    assert_eq!(s.shaping.provider_name(o.provider), "microsoft");
    let s =
        settings("[[provider]]\nname = \"Google\"\nmx = [\"*.google.com\"]\nconnections_max = 3\n");
    assert_eq!(
        s.site_shape(&mx(&["aspmx.l.google.com"]))
            .base
            .connections_max,
        3
    );
    let s = settings("[shaping]\nprovider_defaults = false\n");
    let g = s.site_shape(&mx(&["aspmx.l.google.com"]));
    assert_eq!(g.provider, None);
}

#[test]
fn every_shaping_error_is_reported_with_its_key() {
    let err = error(
        r#"
        [shaping]
        message_rate = "fast"
        [[provider]]
        name = "p"
        mx = []
        [[site]]
        mx = "x.test"
        message_rate = "10/fortnight"
        connections_max = 0
        [[site]]
        provider = "nobody"
        [[site]]
        mx = "y.test"
        source = "nope"
        [[domain]]
        name = "d.test"
        connection_rate = "0/s"
        [[tenant]]
        name = "t"
        message_rate = "1"
    "#,
    );
    for key in [
        "shaping[0].message_rate",
        "provider[0].mx",
        "site[0].message_rate",
        "site[0].connections_max",
        "site[1].provider",
        "site[2].source",
        "domain[0].connection_rate",
        "tenant[0].message_rate",
    ] {
        assert!(
            err.contains(&format!("`{key}`")),
            "{key} missing from:\n{err}"
        );
    }
    assert!(error("[[site]]\nconnections_max = 2\n").contains("`site[0].mx`"));
    assert!(error("[[site]]\nmx = \"a\"\nprovider = \"google\"\n").contains("`site[0].mx`"));
}
