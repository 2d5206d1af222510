use super::*;

/// Real replies of the big providers and common MTAs, and what they mean.
const REPLIES: &[(u16, &str, &str, Category)] = &[
    // Gmail
    (550, "5.1.1", "The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces.", Category::InvalidRecipient),
    (452, "4.2.2", "The email account that you tried to reach is over quota. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp", Category::QuotaIssues),
    (552, "5.2.2", "The email account that you tried to reach is over quota and inactive.", Category::InactiveMailbox),
    (550, "5.2.1", "The email account that you tried to reach is disabled.", Category::InactiveMailbox),
    (421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.", Category::RateLimited),
    (550, "5.7.26", "Unauthenticated email from example.com is not accepted due to domain's DMARC policy.", Category::AuthenticationFailed),
    (550, "5.7.26", "This mail has been blocked because the sender is unauthenticated. Gmail requires all senders to authenticate with either SPF or DKIM.", Category::AuthenticationFailed),
    (550, "5.7.1", "Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked.", Category::SpamContent),
    (421, "4.7.0", "Try again later, closing connection. (EHLO)", Category::RateLimited),
    (550, "5.7.25", "The IP address sending this message does not have a PTR record setup, or the corresponding forward DNS entry does not point to the sending IP.", Category::AuthenticationFailed),
    (550, "5.7.1", "The IP you're using to send mail is not authorized to send email directly to our servers. Please use the SMTP relay at your service provider instead.", Category::SpamBlock),
    (552, "5.7.0", "This message was blocked because its content presents a potential security issue.", Category::SpamContent),
    (552, "5.3.4", "Your message exceeded Google's message size limits.", Category::PolicyRelated),
    (450, "4.2.1", "The user you are trying to contact is receiving mail too quickly. Please resend your message at a later time.", Category::RateLimited),
    // Outlook / Exchange Online
    (550, "5.5.0", "Requested action not taken: mailbox unavailable", Category::InvalidRecipient),
    (550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281) [BN8NAM12FT052.eop-nam12.prod.protection.outlook.com]", Category::InvalidRecipient),
    (550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", Category::SpamBlock),
    (550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3140).", Category::SpamBlock),
    (451, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://postmaster.live.com (S775)", Category::RateLimited),
    (550, "5.7.606", "Access denied, banned sending IP [192.0.2.1]. To request removal from this list please visit https://sender.office.com/", Category::SpamBlock),
    (550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", Category::InvalidRecipient),
    (550, "5.7.509", "Access denied, sending domain example.com does not pass DMARC verification and has a DMARC policy of reject.", Category::AuthenticationFailed),
    (421, "4.3.2", "The maximum number of concurrent connections has exceeded a limit, closing transmission channel", Category::TooManyConnections),
    (554, "5.2.0", "STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded", Category::QuotaIssues),
    // Yahoo / AOL
    (421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", Category::RateLimited),
    (554, "5.7.9", "Message not accepted for policy reasons.  See https://senders.yahooinc.com/error-codes", Category::PolicyRelated),
    (552, "", "1 Requested mail action aborted, mailbox not found", Category::InvalidRecipient),
    (553, "5.7.1", "[BL21] Connections will not be accepted from 192.0.2.1, because the ip is in Spamhaus's list; see https://postmaster.yahooinc.com/error-codes", Category::SpamBlock),
    (554, "", "delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1234.mail.ne1.yahoo.com", Category::InvalidRecipient),
    (554, "", "delivery error: dd Sorry your message to x@yahoo.com cannot be delivered. This mailbox is disabled (554.30). - mta4.mail.bf1.yahoo.com", Category::InactiveMailbox),
    (550, "5.7.9", "This mail has been blocked because the sender is unauthenticated. Yahoo requires all senders to authenticate with either SPF or DKIM.", Category::AuthenticationFailed),
    // Apple / iCloud
    (554, "5.7.1", "[CS01] Message rejected due to local policy. Please visit https://support.apple.com/en-us/HT204137", Category::PolicyRelated),
    (550, "5.1.1", "<x@icloud.com>: user does not exist", Category::InvalidRecipient),
    (552, "5.2.2", "<x@icloud.com>: user is over quota", Category::QuotaIssues),
    (550, "5.7.0", "Blocked - see https://support.proofpoint.com/dnsbl-lookup.cgi?ip=192.0.2.1", Category::SpamBlock),
    // GMX / web.de
    (554, "", "gmx.net (mxgmx117) Nemesis ESMTP Service not available No SMTP service Bad DNS PTR resource record. For explanation visit https://postmaster.gmx.net/en/case?c=r0601", Category::AuthenticationFailed),
    (550, "", "Requested action not taken: mailbox unavailable", Category::InvalidRecipient),
    (554, "", "Transaction failed Reject due to policy restrictions.", Category::PolicyRelated),
    (452, "", "Requested action not taken: mailbox full", Category::QuotaIssues),
    // Mail.ru
    (550, "", "Message was not accepted -- invalid mailbox.  Local mailbox x@mail.ru is unavailable: user not found", Category::InvalidRecipient),
    (550, "", "Message was not accepted -- invalid mailbox.  Local mailbox x@mail.ru is unavailable: account is disabled", Category::InactiveMailbox),
    (550, "", "spam message rejected. Please visit http://help.mail.ru/notspam-support/id?c=abc or report details to abuse@corp.mail.ru", Category::SpamContent),
    (421, "", "Too many messages from 192.0.2.1, ratelimit", Category::RateLimited),
    // Comcast
    (554, "", "resimta-po-01v.sys.comcast.net resimta-po-01v.sys.comcast.net 192.0.2.1 found on one or more DNSBLs, see http://postmaster.comcast.net/smtp-error-codes.php#BL000001", Category::SpamBlock),
    (421, "", "resimta-ch2-12v.sys.comcast.net 192.0.2.1 rate limited, see http://postmaster.comcast.net/smtp-error-codes.php#RL000001", Category::RateLimited),
    (550, "5.1.1", "<x@comcast.net> Not our Customer", Category::InvalidRecipient),
    // Postfix, Exim and friends
    (554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1", Category::SpamBlock),
    (554, "5.7.1", "<x@example.org>: Relay access denied", Category::RoutingErrors),
    (550, "5.1.1", "<x@example.org>: Recipient address rejected: User unknown in virtual mailbox table", Category::InvalidRecipient),
    (450, "4.2.0", "<x@example.org>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.org.html", Category::RateLimited),
    (450, "4.1.2", "<x@nowhere.invalid>: Recipient address rejected: Domain not found", Category::BadDomain),
    (550, "", "No such user here", Category::InvalidRecipient),
    (421, "", "Too many concurrent SMTP connections from this IP address; please try again later.", Category::TooManyConnections),
    (451, "4.4.1", "connection refused", Category::RoutingErrors),
    (556, "5.1.10", "Recipient address has null MX", Category::BadDomain),
    (500, "5.5.1", "Syntax error, command unrecognized", Category::ProtocolErrors),
    (451, "4.4.7", "Delivery time expired", Category::MessageExpired),
];

#[test]
fn real_replies_classify_by_the_default_rules() {
    let c = Classifier::defaults().expect("built-in rules compile");
    assert!(c.len() >= 60, "{} rules", c.len());
    assert!(REPLIES.len() >= 40);
    let mut wrong = Vec::new();
    for &(code, enhanced, text, want) in REPLIES {
        let got = c.classify(code, enhanced, text);
        if got != want {
            wrong.push(format!("{code} {enhanced} {text}: {got}, want {want}"));
        }
    }
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn fallback_by_enhanced_code_then_uncategorized() {
    let c = Classifier::defaults().expect("built-in rules compile");
    assert_eq!(c.classify(550, "5.1.2", "nope"), Category::BadDomain);
    assert_eq!(c.classify(452, "4.2.2", ""), Category::QuotaIssues);
    assert_eq!(c.classify(451, "4.7.0", "come back"), Category::RateLimited);
    assert_eq!(c.classify(550, "", "nope"), Category::Uncategorized);
}

#[test]
fn user_rules_come_first_and_can_drop_the_defaults() {
    let user = r#"
        [[rule]]
        category = "RateLimited"
        code = "4xx"
        enhanced = "4.2."
        text = ['over quota']
        [[rule]]
        category = "SpamBlock"
        code = [550, "55x"]
        text = ['^acme says no$']
    "#;
    let c = Classifier::new(&[("user.toml".into(), user.into())]).expect("compiles");
    let quota = "The email account that you tried to reach is over quota.";
    assert_eq!(c.classify(452, "4.2.2", quota), Category::RateLimited);
    // The user rule's code filter does not hold for a 5xx: the defaults decide.
    assert_eq!(c.classify(552, "5.2.2", quota), Category::QuotaIssues);
    assert_eq!(c.classify(551, "", "ACME says no"), Category::SpamBlock);
    assert_eq!(c.classify(451, "", "ACME says no"), Category::Uncategorized);
    // Unchanged defaults still apply.
    assert_eq!(
        c.classify(550, "", "user unknown"),
        Category::InvalidRecipient
    );

    let only = "defaults = false\n[[rule]]\ncategory = \"SpamBlock\"\ntext = ['x']\n";
    let c = Classifier::new(&[("only.toml".into(), only.into())]).expect("compiles");
    assert_eq!(c.len(), 1);
    assert_eq!(c.classify(550, "", "user unknown"), Category::Uncategorized);
    assert_eq!(
        c.classify(550, "5.1.1", "user unknown"),
        Category::InvalidRecipient
    );
}

#[test]
fn enhanced_prefix_and_exact() {
    let rules = "defaults = false\n[[rule]]\ncategory = \"SpamBlock\"\nenhanced = \"5.7.\"\n\
                 [[rule]]\ncategory = \"QuotaIssues\"\nenhanced = \"5.1.1\"\n";
    let c = Classifier::new(&[("r".into(), rules.into())]).expect("compiles");
    assert_eq!(c.classify(550, "5.7.1", ""), Category::SpamBlock);
    assert_eq!(c.classify(550, "5.1.1", ""), Category::QuotaIssues);
    // Exact: 5.1.10 is not 5.1.1 (the fallback says BadDomain).
    assert_eq!(c.classify(550, "5.1.10", ""), Category::BadDomain);
}

#[test]
fn bad_rules_name_the_rule() {
    let cases = [
        ("[[rule]]\ncategory = \"Nope\"\ntext = ['x']\n", "rule[0]", "unknown category"),
        ("[[rule]]\ncategory = \"SpamBlock\"\ntext = ['x']\n[[rule]]\ncategory = \"SpamBlock\"\ntext = ['(unclosed']\n", "rule[1]", "regex"),
        ("[[rule]]\ncategory = \"SpamBlock\"\ncode = \"6xx\"\n", "rule[0]", "reply code"),
        ("[[rule]]\ncategory = \"SpamBlock\"\n", "rule[0]", "needs code"),
        ("[[rule]]\ncategory = \"SpamBlock\"\ntxt = ['x']\n", "f.toml", "unknown field"),
        ("this is not toml", "f.toml", ""),
    ];
    for (text, names, reason) in cases {
        let err = Classifier::new(&[("f.toml".into(), text.into())])
            .expect_err(text)
            .to_string();
        assert!(err.contains("f.toml"), "{err}");
        assert!(err.contains(names), "{err}");
        assert!(err.contains(reason), "{err}");
    }
}

#[test]
fn code_patterns() {
    let p = |s: &str| CodePattern::parse(&CodeItem::Pattern(s.into())).expect(s);
    assert!(p("5xx").matches(554));
    assert!(!p("5xx").matches(454));
    assert!(p("55x").matches(550));
    assert!(!p("55x").matches(540));
    assert!(p("421").matches(421));
    assert!(CodePattern::parse(&CodeItem::Number(99)).is_err());
    assert!(CodePattern::parse(&CodeItem::Pattern("5x".into())).is_err());
}
