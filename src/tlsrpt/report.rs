//! The aggregate report (RFC 8460 §4): its JSON, gzip'd, and the two ways it travels: a message
//! (§5.3, `multipart/report; report-type="tlsrpt"`) or an HTTPS POST (§5.4).

use std::io::Write as _;

use flate2::write::GzEncoder;
use flate2::Compression;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::MimePart;
use mail_builder::MessageBuilder;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[cfg(test)]
use super::DAY_MS;
use super::{Policy, PolicyTally};

/// Who sends the reports: this MTA's operator.
#[derive(Clone, Debug)]
pub struct Submitter {
    /// `organization-name`.
    pub organization: String,
    /// `contact-info`: an address or URL the domain's operator can reach.
    pub contact: String,
    /// The host name in `TLS-Report-Submitter` and the file name.
    pub host: String,
}

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("cannot encode the report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot compress or build the report: {0}")]
    Io(#[from] std::io::Error),
    #[error("time {0} ms is out of the representable range")]
    Time(u64),
}

/// RFC 8460 §4.4, field for field.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    #[serde(rename = "organization-name")]
    pub organization_name: String,
    #[serde(rename = "date-range")]
    pub date_range: DateRange,
    #[serde(rename = "contact-info")]
    pub contact_info: String,
    #[serde(rename = "report-id")]
    pub report_id: String,
    pub policies: Vec<PolicyReport>,
    /// The period covered, Unix seconds, first and last (for the file name).
    #[serde(skip)]
    pub span_s: (u64, u64),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DateRange {
    #[serde(rename = "start-datetime")]
    pub start: String,
    #[serde(rename = "end-datetime")]
    pub end: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PolicyReport {
    pub policy: PolicyDesc,
    pub summary: Summary,
    #[serde(
        rename = "failure-details",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub failure_details: Vec<FailureDetail>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PolicyDesc {
    #[serde(rename = "policy-type")]
    pub policy_type: String,
    #[serde(
        rename = "policy-string",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub policy_string: Vec<String>,
    #[serde(rename = "policy-domain")]
    pub policy_domain: String,
    #[serde(rename = "mx-host", default, skip_serializing_if = "Vec::is_empty")]
    pub mx_host: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    #[serde(rename = "total-successful-session-count")]
    pub successful: u64,
    #[serde(rename = "total-failure-session-count")]
    pub failed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FailureDetail {
    #[serde(rename = "result-type")]
    pub result_type: String,
    #[serde(
        rename = "sending-mta-ip",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sending_mta_ip: Option<String>,
    #[serde(
        rename = "receiving-mx-hostname",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub receiving_mx_hostname: String,
    #[serde(
        rename = "receiving-ip",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub receiving_ip: Option<String>,
    #[serde(rename = "failed-session-count")]
    pub failed_session_count: u64,
    #[serde(
        rename = "additional-information",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub additional_information: String,
}

/// RFC 3339 in UTC, seconds precision (`2016-04-01T00:00:00Z`).
fn rfc3339(ms: u64) -> Result<String, ReportError> {
    let secs = i64::try_from(ms / 1000).map_err(|_| ReportError::Time(ms))?;
    let t = time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| ReportError::Time(ms))?;
    t.format(&time::format_description::well_known::Rfc3339)
        .map_err(|_| ReportError::Time(ms))
}

impl Report {
    /// The report of policy domain `domain` for period `period` of `period_ms` (a day:
    /// [`DAY_MS`]) since the epoch.
    pub fn build<'a>(
        submitter: &Submitter,
        period: u64,
        period_ms: u64,
        domain: &str,
        policies: impl IntoIterator<Item = (&'a Policy, &'a PolicyTally)>,
    ) -> Result<Report, ReportError> {
        let start_ms = period
            .checked_mul(period_ms)
            .ok_or(ReportError::Time(u64::MAX))?;
        // The last second of the period (RFC 8460's example ends at 23:59:59Z).
        let end_ms = start_ms + period_ms.max(1000) - 1000;
        let date = rfc3339(start_ms)?;
        let mut out = Vec::new();
        for (p, t) in policies {
            out.push(PolicyReport {
                policy: PolicyDesc {
                    policy_type: p.kind.as_str().to_string(),
                    policy_string: p.strings.clone(),
                    policy_domain: p.domain.clone(),
                    mx_host: p.mx_hosts.clone(),
                },
                summary: Summary {
                    successful: t.successful,
                    failed: t.failed,
                },
                failure_details: t
                    .failures
                    .iter()
                    .map(|(f, n)| FailureDetail {
                        result_type: f.result.as_str().to_string(),
                        sending_mta_ip: f.sending_mta_ip.map(|ip| ip.to_string()),
                        receiving_mx_hostname: f.receiving_mx_hostname.clone(),
                        receiving_ip: f.receiving_ip.map(|ip| ip.to_string()),
                        failed_session_count: *n,
                        additional_information: f.additional.clone(),
                    })
                    .collect(),
            });
        }
        Ok(Report {
            organization_name: submitter.organization.clone(),
            date_range: DateRange {
                start: date.clone(),
                end: rfc3339(end_ms)?,
            },
            contact_info: submitter.contact.clone(),
            // Unique per domain and period, and stable: a report sent again is the same one.
            report_id: format!("{}_{}@{}", date, domain, submitter.host),
            policies: out,
            span_s: (start_ms / 1000, end_ms / 1000),
        })
    }

    pub fn json(&self) -> Result<Vec<u8>, ReportError> {
        Ok(serde_json::to_vec(self)?)
    }

    /// The JSON, gzip'd: the body of the POST and the attachment of the message.
    pub fn gzip(&self) -> Result<Vec<u8>, ReportError> {
        let json = self.json()?;
        let mut gz = GzEncoder::new(
            Vec::with_capacity(json.len() / 4 + 64),
            Compression::default(),
        );
        gz.write_all(&json)?;
        Ok(gz.finish()?)
    }

    /// RFC 8460 §5.3: `submitter!policy-domain!begin-timestamp!end-timestamp.json.gz`.
    pub fn filename(&self, submitter: &Submitter, domain: &str) -> String {
        format!(
            "{}!{}!{}!{}.json.gz",
            submitter.host, domain, self.span_s.0, self.span_s.1
        )
    }

    /// The report as a message from `from` to `to` (RFC 8460 §5.3), CRLF lines.
    pub fn message(
        &self,
        submitter: &Submitter,
        domain: &str,
        from: &str,
        to: &str,
        now_s: u64,
    ) -> Result<Vec<u8>, ReportError> {
        let gz = self.gzip()?;
        let text = format!(
            "This is an aggregate TLS report (RFC 8460) from {} for {} on {}.\r\n",
            submitter.organization,
            domain,
            self.date_range.start.get(..10).unwrap_or_default()
        );
        let body = MimePart::new(
            ContentType::new("multipart/report").attribute("report-type", "tlsrpt"),
            vec![
                MimePart::new("text/plain", text),
                MimePart::new("application/tlsrpt+gzip", gz)
                    .attachment(self.filename(submitter, domain)),
            ],
        );
        let msg = MessageBuilder::new()
            .from(from.to_string())
            .to(to.to_string())
            .subject(format!(
                "Report Domain: {domain} Submitter: {} Report-ID: <{}>",
                submitter.host, self.report_id
            ))
            .header("TLS-Report-Domain", Raw::new(domain.to_string()))
            .header("TLS-Report-Submitter", Raw::new(submitter.host.clone()))
            .message_id(format!("tlsrpt.{}", self.report_id))
            .date(now_s)
            .body(body)
            .write_to_vec()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read as _;

    use super::super::{Failure, PolicyType, ResultType};
    use super::*;

    fn sample() -> (Submitter, Policy, PolicyTally) {
        let sub = Submitter {
            organization: "Epoxi Test".into(),
            contact: "postmaster@mta.test".into(),
            host: "mta.test".into(),
        };
        let policy = Policy {
            kind: PolicyType::Sts,
            domain: "company-y.example".into(),
            strings: vec!["version: STSv1".into(), "mode: testing".into()],
            mx_hosts: vec!["*.mail.company-y.example".into()],
        };
        let mut failures = BTreeMap::new();
        failures.insert(
            Failure {
                result: ResultType::CertificateExpired,
                sending_mta_ip: "2001:db8:abcd:0012::1".parse().ok(),
                receiving_ip: "203.0.113.56".parse().ok(),
                receiving_mx_hostname: "mx2.mail.company-y.example".into(),
                additional: String::new(),
            },
            100,
        );
        let tally = PolicyTally {
            successful: 5326,
            failed: 303,
            failures,
        };
        (sub, policy, tally)
    }

    #[test]
    fn report_json_has_the_rfc_fields() {
        let (sub, policy, tally) = sample();
        // 2016-04-01 is day 16892.
        let r = Report::build(
            &sub,
            16_892,
            DAY_MS,
            "company-y.example",
            [(&policy, &tally)],
        )
        .expect("build");
        let v: serde_json::Value = serde_json::from_slice(&r.json().expect("json")).expect("parse");
        assert_eq!(v["date-range"]["start-datetime"], "2016-04-01T00:00:00Z");
        assert_eq!(v["date-range"]["end-datetime"], "2016-04-01T23:59:59Z");
        assert_eq!(v["organization-name"], "Epoxi Test");
        let p = &v["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert_eq!(p["policy"]["policy-domain"], "company-y.example");
        assert_eq!(p["policy"]["mx-host"][0], "*.mail.company-y.example");
        assert_eq!(p["summary"]["total-successful-session-count"], 5326);
        assert_eq!(p["summary"]["total-failure-session-count"], 303);
        let f = &p["failure-details"][0];
        assert_eq!(f["result-type"], "certificate-expired");
        assert_eq!(f["sending-mta-ip"], "2001:db8:abcd:12::1");
        assert_eq!(f["receiving-ip"], "203.0.113.56");
        assert_eq!(f["failed-session-count"], 100);
    }

    #[test]
    fn gzip_round_trips() {
        let (sub, policy, tally) = sample();
        let r = Report::build(
            &sub,
            16_892,
            DAY_MS,
            "company-y.example",
            [(&policy, &tally)],
        )
        .expect("build");
        let gz = r.gzip().expect("gzip");
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut json)
            .expect("gunzip");
        let back: Report = serde_json::from_slice(&json).expect("parse");
        assert_eq!(back.json().expect("json"), r.json().expect("json"));
    }

    #[test]
    fn message_is_a_tlsrpt_multipart_report() {
        let (sub, policy, tally) = sample();
        let r = Report::build(
            &sub,
            16_892,
            DAY_MS,
            "company-y.example",
            [(&policy, &tally)],
        )
        .expect("build");
        let m = r
            .message(
                &sub,
                "company-y.example",
                "tlsrpt@mta.test",
                "reports@company-y.example",
                1_459_555_200,
            )
            .expect("message");
        let m = String::from_utf8(m).expect("ascii");
        assert!(
            m.contains("TLS-Report-Domain: company-y.example\r\n"),
            "{m}"
        );
        assert!(m.contains("TLS-Report-Submitter: mta.test\r\n"), "{m}");
        assert!(m.contains("multipart/report"), "{m}");
        assert!(m.contains("report-type=\"tlsrpt\""), "{m}");
        assert!(m.contains("application/tlsrpt+gzip"), "{m}");
        assert!(
            m.contains("mta.test!company-y.example!1459468800!1459555199.json.gz"),
            "{m}"
        );
        assert!(m.contains("Content-Transfer-Encoding: base64"), "{m}");
    }
}
