//! Bounce classification: the built-in rules on a table of real provider replies. The budget
//! is 2 µs per reply (it runs for every failed recipient, on the shard).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use epoxi::bounce::Classifier;

const REPLIES: &[(u16, &str, &str)] = &[
    (550, "5.1.1", "The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces."),
    (452, "4.2.2", "The email account that you tried to reach is over quota. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp"),
    (421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited."),
    (550, "5.7.26", "Unauthenticated email from example.com is not accepted due to domain's DMARC policy."),
    (550, "5.7.1", "Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked."),
    (421, "4.7.0", "Try again later, closing connection. (EHLO)"),
    (550, "5.5.0", "Requested action not taken: mailbox unavailable"),
    (550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281) [BN8NAM12FT052.eop-nam12.prod.protection.outlook.com]"),
    (550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150)."),
    (451, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://postmaster.live.com (S775)"),
    (550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"),
    (421, "4.3.2", "The maximum number of concurrent connections has exceeded a limit, closing transmission channel"),
    (421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"),
    (554, "5.7.9", "Message not accepted for policy reasons.  See https://senders.yahooinc.com/error-codes"),
    (552, "", "1 Requested mail action aborted, mailbox not found"),
    (553, "5.7.1", "[BL21] Connections will not be accepted from 192.0.2.1, because the ip is in Spamhaus's list; see https://postmaster.yahooinc.com/error-codes"),
    (554, "", "delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1234.mail.ne1.yahoo.com"),
    (554, "5.7.1", "[CS01] Message rejected due to local policy. Please visit https://support.apple.com/en-us/HT204137"),
    (552, "5.2.2", "<x@icloud.com>: user is over quota"),
    (554, "", "gmx.net (mxgmx117) Nemesis ESMTP Service not available No SMTP service Bad DNS PTR resource record. For explanation visit https://postmaster.gmx.net/en/case?c=r0601"),
    (554, "", "Transaction failed Reject due to policy restrictions."),
    (550, "", "Message was not accepted -- invalid mailbox.  Local mailbox x@mail.ru is unavailable: user not found"),
    (550, "", "spam message rejected. Please visit http://help.mail.ru/notspam-support/id?c=abc or report details to abuse@corp.mail.ru"),
    (554, "", "resimta-po-01v.sys.comcast.net 192.0.2.1 found on one or more DNSBLs, see http://postmaster.comcast.net/smtp-error-codes.php#BL000001"),
    (421, "", "resimta-ch2-12v.sys.comcast.net 192.0.2.1 rate limited, see http://postmaster.comcast.net/smtp-error-codes.php#RL000001"),
    (554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1"),
    (554, "5.7.1", "<x@example.org>: Relay access denied"),
    (550, "5.1.1", "<x@example.org>: Recipient address rejected: User unknown in virtual mailbox table"),
    (450, "4.2.0", "<x@example.org>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.org.html"),
    (421, "", "Too many concurrent SMTP connections from this IP address; please try again later."),
    (451, "4.4.1", "connection refused"),
];

fn classify(c: &mut Criterion) {
    let classifier = match Classifier::defaults() {
        Ok(c) => c,
        Err(e) => panic!("built-in rules: {e}"),
    };
    let mut group = c.benchmark_group("bounce");
    group.throughput(Throughput::Elements(REPLIES.len() as u64));
    group.bench_function("classify_table", |b| {
        b.iter(|| {
            for &(code, enhanced, text) in REPLIES {
                std::hint::black_box(classifier.classify(
                    std::hint::black_box(code),
                    enhanced,
                    std::hint::black_box(text),
                ));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, classify);
criterion_main!(benches);
