//! `headend pay`: billing's payment confirmation, and the reconnects it causes.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use headend::contract::{
    AccountId, Amount, Payment, PaymentId, PaymentOutcome, PaymentReconnect, ResultMessage, Status,
};

use super::link::Link;

use super::{
    button_note, clean, generated_id, settings, status_line, time, Out, PayArgs, EXIT_BROKER, EXIT_FAILED, EXIT_INPUT,
    EXIT_TIMEOUT,
};

fn build_payment(a: &PayArgs) -> Result<Payment, String> {
    let id = a.id.clone().unwrap_or_else(|| generated_id("cli-pay"));
    let currency_ok = a.currency.len() == 3 && a.currency.bytes().all(|b| b.is_ascii_uppercase());
    if !currency_ok {
        return Err(format!("--currency {:?}: use an ISO 4217 code such as CNY", a.currency));
    }
    let payment = Payment {
        id: PaymentId::new(&id).map_err(|e| format!("--id: {e}"))?,
        account: AccountId::new(&a.account).map_err(|e| format!("--account: {e}"))?,
        amount: Some(
            Amount::new(&a.amount).ok_or_else(|| format!("--amount {:?}: write a decimal like 120.50", a.amount))?,
        ),
        currency: Some(a.currency.clone()),
        cleared: a.cleared,
        confirmed_at: time("--confirmed-at", a.confirmed_at.as_deref())?,
    };
    // Through the daemon's own parser, as for commands.
    Payment::parse(payment.to_json().as_bytes()).map_err(|r| r.message)
}

/// `headend pay`.
pub async fn pay(a: PayArgs) -> ExitCode {
    let out = Out { json: a.common.json };
    let payment = match build_payment(&a) {
        Ok(p) => p,
        Err(e) => return out.fail(EXIT_INPUT, "bad_input", &e),
    };
    let s = match settings(&a.common) {
        Ok(s) => s,
        Err(e) => return out.fail(EXIT_INPUT, "bad_input", &e),
    };
    let until = Instant::now() + s.timeout;
    let p = s.topics.prefix();
    let outcome_topic = format!("{p}/payment/{}", payment.id);
    let results = format!("{p}/result/");
    let filters = vec![outcome_topic.clone(), format!("{p}/result/+")];
    let mut link = match Link::open(&s, filters, s.topics.payments(), payment.to_json(), until).await {
        Ok(l) => l,
        Err(e) => return out.fail(EXIT_BROKER, "broker_unreachable", &e),
    };
    out.say(&format!(
        "payment {} for {}: published on {}; waiting up to {} s",
        payment.id,
        payment.account,
        s.topics.payments(),
        s.timeout.as_secs_f64()
    ));
    let mut outcome: Option<PaymentOutcome> = None;
    // Statuses by command id. Results may come before the payment's own message, so until
    // then everything that may be a payment's reconnect is kept.
    let mut statuses: BTreeMap<String, Vec<ResultMessage>> = BTreeMap::new();
    loop {
        if outcome.as_ref().is_some_and(|o| settled(o, &statuses)) {
            break;
        }
        let Some(msg) = link.next(until).await else { break };
        if msg.topic == outcome_topic {
            if outcome.is_some() {
                // A repeat, answering our publish after a reconnect: the first one has the list.
                continue;
            }
            let o = match serde_json::from_slice::<PaymentOutcome>(&msg.payload) {
                Ok(o) if o.id.as_deref() == Some(payment.id.as_str()) => o,
                Ok(_) => continue,
                Err(e) => {
                    link.close().await;
                    let raw = clean(&String::from_utf8_lossy(&msg.payload));
                    return out.fail(
                        EXIT_FAILED,
                        "unreadable",
                        &format!("unreadable answer on {outcome_topic} ({e}): {raw}"),
                    );
                }
            };
            out.say(&outcome_line(&o, &payment));
            for r in &o.reconnects {
                let earlier = statuses.get(&r.id).into_iter().flatten();
                for m in earlier.filter(|m| m.meter == r.meter) {
                    out.say(&format!("{:<14}{}", clean(&r.meter), status_line(m)));
                }
            }
            outcome = Some(o);
        } else if msg.topic.starts_with(&results) {
            let Ok(r) = serde_json::from_slice::<ResultMessage>(&msg.payload) else { continue };
            let Some(id) = r.id.clone() else { continue };
            let ours = match &outcome {
                Some(o) => o.reconnects.iter().any(|x| x.id == id && x.meter == r.meter),
                None => r.trigger.as_ref().is_some_and(|t| t.payment == payment.id) || id.starts_with("pay:"),
            };
            if !ours {
                continue;
            }
            if outcome.is_some() {
                out.say(&format!("{:<14}{}", clean(&r.meter), status_line(&r)));
            }
            statuses.entry(id).or_default().push(r);
        }
    }
    link.close().await;
    conclude_payment(out, &payment, outcome.as_ref(), &statuses, s.timeout)
}

fn last_of<'a>(statuses: &'a BTreeMap<String, Vec<ResultMessage>>, r: &PaymentReconnect) -> Option<&'a ResultMessage> {
    statuses.get(&r.id).and_then(|v| v.iter().rev().find(|m| m.meter == r.meter))
}

fn settled(o: &PaymentOutcome, statuses: &BTreeMap<String, Vec<ResultMessage>>) -> bool {
    o.error.is_some()
        || !o.cleared
        || o.reconnects.iter().all(|r| last_of(statuses, r).is_some_and(|m| m.status.is_final()))
}

fn outcome_line(o: &PaymentOutcome, payment: &Payment) -> String {
    let id = &payment.id;
    match &o.error {
        Some(e) => format!("payment {id}: refused: {}: {}", e.code, clean(&e.message)),
        None if !o.cleared => format!("payment {id}: recorded, not cleared: nothing changes"),
        None if o.duplicate && o.reconnects.is_empty() => format!(
            "payment {id}: seen before, nothing new to do (its reconnects, if any, were made then: see headend audit)"
        ),
        None if o.reconnects.is_empty() => format!("payment {id}: taken; no meter of this account was cut for arrears"),
        None => {
            let meters: Vec<String> =
                o.reconnects.iter().map(|r| format!("{} ({})", clean(&r.meter), clean(&r.id))).collect();
            format!("payment {id}: taken; reconnecting {}", meters.join(", "))
        }
    }
}

fn conclude_payment(
    out: Out,
    payment: &Payment,
    outcome: Option<&PaymentOutcome>,
    statuses: &BTreeMap<String, Vec<ResultMessage>>,
    wait: Duration,
) -> ExitCode {
    let follow = format!("re-run with --id {} to follow it; the same id is safe", payment.id);
    let mut lines = Vec::new();
    let mut reconnects = Vec::new();
    let (code, result) = match outcome {
        None => {
            lines.push(format!(
                "no answer to payment {} within {} s: is the daemon running? ({follow})",
                payment.id,
                wait.as_secs_f64()
            ));
            (EXIT_TIMEOUT, "timeout")
        }
        Some(o) if o.error.is_some() => (EXIT_FAILED, "refused"),
        Some(o) if !o.cleared => (0, "not_cleared"),
        Some(o) if o.duplicate && o.reconnects.is_empty() => (0, "duplicate"),
        Some(o) if o.reconnects.is_empty() => (0, "no_reconnects"),
        Some(o) => {
            let mut code = 0;
            for r in &o.reconnects {
                let last = last_of(statuses, r);
                let status = last.map(|m| m.status);
                let meter = clean(&r.meter);
                let secs = wait.as_secs_f64();
                lines.push(match status {
                    Some(Status::Succeeded) => format!("{meter}: reconnected"),
                    Some(Status::Armed) => button_note(&r.meter),
                    Some(st) if st.is_final() => {
                        let why =
                            last.and_then(|m| m.error.as_ref()).map(|e| format!(": {}", e.code)).unwrap_or_default();
                        format!("{meter}: reconnect {}{why}", st.as_str())
                    }
                    Some(st) => format!("{meter}: no final status within {secs} s; the last was {}", st.as_str()),
                    None => format!("{meter}: no status within {secs} s"),
                });
                let this = match status {
                    Some(Status::Succeeded | Status::Armed) => 0,
                    Some(st) if st.is_final() => EXIT_FAILED,
                    _ => EXIT_TIMEOUT,
                };
                code = code.max(this);
                let all: &[ResultMessage] = statuses.get(&r.id).map_or(&[], Vec::as_slice);
                reconnects.push(json!({"id": r.id, "meter": r.meter, "status": status, "last": last, "statuses": all}));
            }
            if code == EXIT_TIMEOUT {
                lines.push(format!("payment {}: some reconnects are not final yet ({follow})", payment.id));
            }
            let result = match code {
                0 => "reconnected",
                EXIT_FAILED => "failed",
                _ => "timeout",
            };
            (code, result)
        }
    };
    for l in &lines {
        out.say(l);
    }
    if out.json {
        let summary = json!({
            "id": payment.id, "account": payment.account, "outcome": result, "exit_code": code,
            "payment": outcome, "reconnects": reconnects,
        });
        println!("{summary}");
    }
    ExitCode::from(code)
}
