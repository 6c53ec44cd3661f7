//! Teams, keys and secrets: who may do what, and the values runners get.

use std::collections::BTreeMap;

use api::error::{ApiError, ErrorCode};
use api::router::Caller;
use api::wire::{CreatedKeyJson, CreatedTeamJson, KeyJson, MAX_KEY_DESCRIPTION_CHARS, SecretJson, TeamJson, rfc3339};
use model::manifest::{validate_app_name, validate_env_name};
use model::records::Key;
use model::revision::KeyScope;
use store::StoreError;
use uuid::Uuid;

use crate::auth;
use crate::control::{Control, internal};

/// The longest secret value accepted.
const MAX_SECRET_BYTES: usize = api::wire::MAX_SECRET_BYTES;

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Forbidden, message)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

impl Control {
    fn require_root(caller: &Caller) -> Result<(), ApiError> {
        if caller.scope == KeyScope::Root { Ok(()) } else { Err(forbidden("only the root key can manage teams")) }
    }

    pub(crate) async fn teams(&self, caller: &Caller) -> Result<Vec<TeamJson>, ApiError> {
        Self::require_root(caller)?;
        Ok(self.store.list_teams().await.map_err(internal)?.iter().map(TeamJson::from).collect())
    }

    pub(crate) async fn new_team(&self, caller: &Caller, name: &str) -> Result<CreatedTeamJson, ApiError> {
        Self::require_root(caller)?;
        validate_app_name(name).map_err(|e| invalid(format!("team name: {e}")))?;
        if name == "queue" {
            return Err(invalid("team name \"queue\" is reserved: the gateway serves the queue at /queue/".to_owned()));
        }
        let team = match self.store.create_team(name).await {
            Ok(team) => team,
            Err(StoreError::AlreadyExists(_)) => {
                return Err(ApiError::new(ErrorCode::Conflict, format!("team {name:?} already exists")));
            }
            Err(e) => return Err(internal(e)),
        };
        let key = self.make_key(team.id, KeyScope::Admin, Some(format!("first admin key of team {name}"))).await?;
        tracing::info!(team = %name, key_id = %key.id, by = %caller.key_id, "team created");
        Ok(CreatedTeamJson { team: TeamJson::from(&team), key })
    }

    async fn make_key(
        &self,
        team_id: Uuid,
        scope: KeyScope,
        description: Option<String>,
    ) -> Result<CreatedKeyJson, ApiError> {
        let key = auth::generate_key();
        let record = Key {
            id: key.id.clone(),
            team_id,
            scope,
            description,
            created_at: time::OffsetDateTime::now_utc(),
            revoked_at: None,
        };
        self.store.create_key(record, key.secret_hash).await.map_err(internal)?;
        Ok(CreatedKeyJson { id: key.id, key: key.full, scope: scope.as_str().to_owned() })
    }

    pub(crate) async fn keys(&self, caller: &Caller) -> Result<Vec<KeyJson>, ApiError> {
        Ok(self.store.list_keys(caller.team_id).await.map_err(internal)?.iter().map(KeyJson::from).collect())
    }

    pub(crate) async fn new_key(
        &self,
        caller: &Caller,
        scope: &str,
        description: Option<String>,
    ) -> Result<CreatedKeyJson, ApiError> {
        let scope = match KeyScope::parse(scope) {
            Some(scope @ (KeyScope::Admin | KeyScope::Api)) => scope,
            _ => return Err(invalid(format!("scope {scope:?} is not one of: admin, api"))),
        };
        // Characters, not bytes: the limit is the one the OpenAPI document states
        // (`maxLength`), and a description in any script gets the same room.
        if let Some(d) = &description
            && d.chars().count() > MAX_KEY_DESCRIPTION_CHARS
        {
            return Err(invalid(format!(
                "the description is longer than {MAX_KEY_DESCRIPTION_CHARS} characters ({})",
                d.chars().count()
            )));
        }
        let key = self.make_key(caller.team_id, scope, description).await?;
        tracing::info!(team = %caller.team, key_id = %key.id, scope = scope.as_str(), by = %caller.key_id, "key created");
        Ok(key)
    }

    pub(crate) async fn revoke(&self, caller: &Caller, id: &str) -> Result<KeyJson, ApiError> {
        let not_found = || ApiError::new(ErrorCode::NotFound, format!("team {:?} has no key {id:?}", caller.team));
        let stored = self.store.key_by_id(id).await.map_err(internal)?.ok_or_else(not_found)?;
        let key = stored.key;
        if key.team_id != caller.team_id {
            return Err(not_found());
        }
        if key.scope == KeyScope::Root && caller.scope != KeyScope::Root {
            return Err(forbidden("only the root key can revoke the root key"));
        }
        if !self.store.revoke_key(id).await.map_err(internal)? {
            return Err(ApiError::new(ErrorCode::Conflict, format!("key {id} is already revoked")));
        }
        tracing::info!(team = %caller.team, key_id = %id, by = %caller.key_id, "key revoked");
        let revoked = self.store.key_by_id(id).await.map_err(internal)?.ok_or_else(not_found)?;
        Ok(KeyJson::from(&revoked.key))
    }

    pub(crate) async fn secret_list(&self, caller: &Caller) -> Result<Vec<SecretJson>, ApiError> {
        let secrets = self.store.secrets(caller.team_id).await.map_err(internal)?;
        Ok(secrets
            .iter()
            .map(|s| SecretJson {
                name: s.name.clone(),
                created_at: rfc3339(s.created_at),
                updated_at: rfc3339(s.updated_at),
            })
            .collect())
    }

    pub(crate) async fn secret_set(
        &self,
        caller: &Caller,
        values: BTreeMap<String, String>,
    ) -> Result<Vec<SecretJson>, ApiError> {
        if values.is_empty() {
            return Err(invalid("no secrets given: send at least one NAME=VALUE"));
        }
        // Every name and value is checked before anything is stored: all or nothing.
        for (name, value) in &values {
            validate_env_name(name).map_err(|e| invalid(format!("secret name: {e}")))?;
            if name == "PORT" || name.starts_with("HANGAR_") {
                return Err(invalid(format!("secret name {name:?} is reserved for the platform")));
            }
            if value.len() > MAX_SECRET_BYTES {
                return Err(invalid(format!("secret {name} is longer than {MAX_SECRET_BYTES} bytes")));
            }
        }
        for (name, value) in &values {
            let (nonce, sealed) =
                self.fleet.shared.secrets.seal(caller.team_id, name, value).map_err(ApiError::internal)?;
            self.store.put_secret(caller.team_id, name, nonce, sealed).await.map_err(internal)?;
        }
        let names: Vec<&str> = values.keys().map(String::as_str).collect();
        tracing::info!(team = %caller.team, ?names, by = %caller.key_id, "secrets set");
        self.record_for_every_app(caller, "secrets_set", &format!("secrets set: {}", names.join(", "))).await?;
        let all = self.secret_list(caller).await?;
        Ok(all.into_iter().filter(|s| values.contains_key(&s.name)).collect())
    }

    pub(crate) async fn secret_unset(&self, caller: &Caller, name: &str) -> Result<(), ApiError> {
        if !self.store.delete_secret(caller.team_id, name).await.map_err(internal)? {
            return Err(ApiError::new(ErrorCode::NotFound, format!("team {:?} has no secret {name:?}", caller.team)));
        }
        tracing::info!(team = %caller.team, name, by = %caller.key_id, "secret unset");
        self.record_for_every_app(caller, "secret_unset", &format!("secret unset: {name}")).await
    }

    /// A change of the team's secrets reaches every app's next runners, so it goes in
    /// every app's history: names only, never values.
    async fn record_for_every_app(&self, caller: &Caller, action: &str, details: &str) -> Result<(), ApiError> {
        for app in self.store.list_apps(caller.team_id).await.map_err(internal)? {
            self.store
                .add_history(store::NewHistory {
                    app_id: app.id,
                    action: action.to_owned(),
                    key_id: Some(caller.key_id.clone()),
                    details: details.to_owned(),
                })
                .await
                .map_err(internal)?;
        }
        Ok(())
    }
}
