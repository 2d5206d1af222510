//! `epoxi dns-records`: the DNS records the configuration needs, for each signing domain
//! (every `[[dkim]]` domain): SPF, the DKIM keys (public halves of the loaded keys), DMARC,
//! MTA-STS and TLSRPT. Text to paste into a zone file; nothing is looked up.
//!
//! Values Epoxi cannot know are marked: the MX hosts of an MTA-STS policy, and the report
//! addresses (defaulting to `dmarc@` and `tlsrpt@` the domain).

use std::fmt::Write as _;

use crate::dkim::keygen::{dkim_record, txt_record};
use crate::settings::Settings;

/// The records, as zone-file lines with `;` comments. `now_s` makes the MTA-STS `id`.
pub fn dns_records(settings: &Settings, now_s: u64) -> String {
    let mut out = String::new();
    let mut domains: Vec<&str> = Vec::new();
    for s in &settings.dkim.list {
        if !domains.contains(&s.domain.as_str()) {
            domains.push(&s.domain);
        }
    }
    if domains.is_empty() {
        out.push_str("; no [[dkim]] tables: no signing domain to publish records for\n");
        return out;
    }
    let spf = spf_value(settings);
    // Writing into a String cannot fail.
    for domain in domains {
        let _ = writeln!(out, "; --- {domain}");
        let _ = writeln!(out, "; SPF: the addresses Epoxi sends from");
        let _ = writeln!(out, "{}", txt_record(domain, &spf));
        for s in settings.dkim.list.iter().filter(|s| s.domain == domain) {
            let _ = writeln!(
                out,
                "; DKIM: selector {} ({}, {} bits)",
                s.selector,
                s.key.algorithm().tag(),
                s.key.bits()
            );
            let _ = writeln!(out, "{}", dkim_record(domain, &s.selector, &s.key));
        }
        let _ = writeln!(
            out,
            "; DMARC: start with p=none, read the reports, then quarantine or reject"
        );
        let _ = writeln!(
            out,
            "{}",
            txt_record(
                &format!("_dmarc.{domain}"),
                &format!("v=DMARC1; p=none; rua=mailto:dmarc@{domain}")
            )
        );
        let _ = writeln!(
            out,
            "; MTA-STS: change id whenever the policy changes; serve the policy at\n\
             ; https://mta-sts.{domain}/.well-known/mta-sts.txt (a certificate valid for\n\
             ; mta-sts.{domain}), e.g.:\n\
             ;   version: STSv1\n\
             ;   mode: testing\n\
             ;   mx: {}   (this domain's inbound MX hosts)\n\
             ;   max_age: 604800",
            settings.hostname
        );
        let _ = writeln!(
            out,
            "{}",
            txt_record(
                &format!("_mta-sts.{domain}"),
                &format!("v=STSv1; id={now_s}")
            )
        );
        let _ = writeln!(out, "; TLSRPT: where receivers send TLS reports (RFC 8460)");
        let _ = writeln!(
            out,
            "{}",
            txt_record(
                &format!("_smtp._tls.{domain}"),
                &format!("v=TLSRPTv1; rua=mailto:tlsrpt@{domain}")
            )
        );
    }
    out
}

/// `v=spf1 …`: the configured egress source addresses, or, with none configured (the kernel
/// picks the address), the A/AAAA records of the HELO name.
fn spf_value(settings: &Settings) -> String {
    let mut spf = String::from("v=spf1");
    let mut any = false;
    for source in &settings.config.source {
        match source.address {
            Some(std::net::IpAddr::V4(a)) => {
                let _ = write!(spf, " ip4:{a}");
                any = true;
            }
            Some(std::net::IpAddr::V6(a)) => {
                let _ = write!(spf, " ip6:{a}");
                any = true;
            }
            None => {}
        }
    }
    if !any {
        let _ = write!(spf, " a:{}", settings.helo_name);
    }
    spf.push_str(" ~all");
    spf
}
