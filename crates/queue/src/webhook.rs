//! Webhooks: when a request that named one completes, its result is POSTed there as
//! fal does it: `{request_id, gateway_request_id, status: "OK" | "ERROR", payload,
//! error}`. Delivery is tried a few times with growing pauses; whether it succeeded
//! is stored, and deliveries still pending are sent again after a restart.

use std::sync::Arc;

use model::revision::WebhookState;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::Queue;

impl Queue {
    pub(crate) fn spawn_webhook(self: &Arc<Self>, id: Uuid) {
        let queue = self.clone();
        self.tasks.spawn(async move {
            if let Err(e) = queue.deliver(id).await {
                tracing::warn!(request = %id, error = %e, "webhook delivery stopped by a store error");
            }
        });
    }

    async fn deliver(&self, id: Uuid) -> Result<(), store::StoreError> {
        let Some(request) = self.store.queue_request(id).await? else { return Ok(()) };
        let (Some(url), Some(outcome)) = (request.webhook.clone(), request.outcome.clone()) else { return Ok(()) };
        let Some((result, _)) = self.store.queue_result(id).await? else { return Ok(()) };
        let payload: Value = serde_json::from_slice(&result.body).unwrap_or(Value::Null);
        let ok = outcome.error.is_none();
        let body = json!({
            "request_id": id.to_string(),
            "gateway_request_id": id.to_string(),
            "status": if ok { "OK" } else { "ERROR" },
            "payload": payload,
            "error": outcome.error,
            "error_type": outcome.error_type,
        });
        // Checked again now: what a name resolves to may have changed since the submit.
        // (The client's resolver keeps names off refused addresses; this covers literals.)
        if let Ok(parsed) = reqwest::Url::parse(&url)
            && let Err(why) = self.config.webhook_policy.check(&parsed).await
        {
            tracing::warn!(request = %id, url = %url, %why, "webhook refused");
            return self.store.queue_set_webhook(id, WebhookState::Failed).await;
        }
        let mut pause = self.config.webhook_backoff;
        for attempt in 1..=self.config.webhook_attempts.max(1) {
            match self.client.post(&url).json(&body).send().await {
                Ok(response) if response.status().is_success() => {
                    return self.store.queue_set_webhook(id, WebhookState::Delivered).await;
                }
                Ok(response) => {
                    tracing::info!(request = %id, attempt, status = response.status().as_u16(), "webhook refused the result");
                }
                Err(e) => tracing::info!(request = %id, attempt, error = %e, "webhook unreachable"),
            }
            if attempt < self.config.webhook_attempts {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    // Still pending in the store: sent again after the restart.
                    () = self.shutdown.cancelled() => return Ok(()),
                }
                pause *= 2;
            }
        }
        tracing::warn!(request = %id, url = %url, "webhook delivery failed for good");
        self.store.queue_set_webhook(id, WebhookState::Failed).await
    }
}
