//! Shard leases in a KCL 2.x lease table (DynamoDB), for
//! `Convoy.Leases.Coordinator`: the table's schema, and the conditional
//! writes of the KCL protocol (take, renew, checkpoint, release), each
//! conditional on `leaseCounter` so that a worker that lost a lease can never
//! write it again.
//!
//! The leases this worker holds are kept here, each behind its own async
//! mutex with the counter it last wrote: renewals (from the coordinator) and
//! checkpoints (from shard dispatchers) of one lease are serialized without a
//! process hop, and never race each other on the counter.
//!
//! Every DynamoDB request is counted (`lease_calls/1`) so the cost per lease
//! can be measured.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus,
};
use rustler::{Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::error::{Error, Reason};
use crate::kinesis_config::KinesisConfig;
use crate::reply::ReplyTo;
use crate::runtime;
use convoy_core::retry;

// KCL 2.x attribute names (DynamoDBLeaseSerializer).
const LEASE_KEY: &str = "leaseKey";
const LEASE_OWNER: &str = "leaseOwner";
const LEASE_COUNTER: &str = "leaseCounter";
const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_SUB: &str = "checkpointSubSequenceNumber";
const OWNER_SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
const PARENT_SHARD_IDS: &str = "parentShardId";
const CHILD_SHARD_IDS: &str = "childShardIds";
const PENDING_CHECKPOINT: &str = "pendingCheckpoint";
const PENDING_CHECKPOINT_SUB: &str = "pendingCheckpointSubSequenceNumber";
const ENTITY_TYPE: &str = "entityType";

// KCL 3.x migration marker (MigrationState, CoordinatorState).
const COORDINATOR_STATE_SUFFIX: &str = "-CoordinatorState";
const COORDINATOR_STATE_KEY: &str = "key";
const MIGRATION_KEY: &str = "Migration3.0";
const CLIENT_VERSION: &str = "cv";

/// A lease as stored, with the Elixir names of `%Convoy.Leases.Lease{}`.
#[derive(rustler::NifStruct, Debug, Clone, Default)]
#[module = "Convoy.Leases.Lease"]
pub struct Lease {
    pub key: String,
    pub owner: Option<String>,
    pub counter: u64,
    pub checkpoint: Option<String>,
    pub checkpoint_sub_sequence_number: u64,
    pub owner_switches_since_checkpoint: u64,
    pub parent_shard_ids: Vec<String>,
    pub child_shard_ids: Vec<String>,
    pub pending_checkpoint: Option<String>,
}

/// A lease this worker holds, and the counter it last wrote.
struct Held {
    counter: u64,
}

pub struct LeaseClientResource {
    client: aws_sdk_dynamodb::Client,
    table: String,
    worker_id: String,
    held: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Held>>>>,
    calls: AtomicU64,
}

#[rustler::resource_impl]
impl rustler::Resource for LeaseClientResource {}

type Client = ResourceArc<LeaseClientResource>;

impl LeaseClientResource {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    fn held(&self, key: &str) -> Option<Arc<tokio::sync::Mutex<Held>>> {
        self.held.lock().ok()?.get(key).cloned()
    }

    fn hold(&self, key: &str, counter: u64) {
        if let Ok(mut held) = self.held.lock() {
            held.insert(
                key.to_string(),
                Arc::new(tokio::sync::Mutex::new(Held { counter })),
            );
        }
    }

    fn forget(&self, key: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(key);
        }
    }

    /// Drops `hold` if it is still the key's: a lease taken again since has
    /// a hold of its own.
    fn forget_hold(&self, key: &str, hold: &Arc<tokio::sync::Mutex<Held>>) {
        if let Ok(mut held) = self.held.lock() {
            if held
                .get(key)
                .is_some_and(|current| Arc::ptr_eq(current, hold))
            {
                held.remove(key);
            }
        }
    }

    fn held_keys(&self) -> Vec<(String, Arc<tokio::sync::Mutex<Held>>)> {
        match self.held.lock() {
            Ok(held) => held.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_string())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn key_of(key: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([(LEASE_KEY.to_string(), s(key))])
}

fn is_condition_failure<E>(error: &SdkError<E>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    match error {
        SdkError::ServiceError(e) => e.err().code() == Some("ConditionalCheckFailedException"),
        _ => false,
    }
}

fn is_not_found<E>(error: &SdkError<E>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    match error {
        SdkError::ServiceError(e) => e.err().code() == Some("ResourceNotFoundException"),
        _ => false,
    }
}

/// A lease read from an item, or None for an item that is not a KCL shard
/// lease (another kind of entity, or one without a counter).
fn from_item(item: &HashMap<String, AttributeValue>) -> Option<Lease> {
    let string = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    let number = |name: &str| {
        item.get(name)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let set = |name: &str| {
        item.get(name)
            .and_then(|v| v.as_ss().ok())
            .cloned()
            .unwrap_or_default()
    };
    if let Some(kind) = string(ENTITY_TYPE) {
        if kind != "LEASE" {
            return None;
        }
    }
    Some(Lease {
        key: string(LEASE_KEY)?,
        owner: string(LEASE_OWNER),
        counter: number(LEASE_COUNTER)?,
        checkpoint: string(CHECKPOINT),
        checkpoint_sub_sequence_number: number(CHECKPOINT_SUB).unwrap_or(0),
        owner_switches_since_checkpoint: number(OWNER_SWITCHES).unwrap_or(0),
        parent_shard_ids: set(PARENT_SHARD_IDS),
        child_shard_ids: set(CHILD_SHARD_IDS),
        pending_checkpoint: string(PENDING_CHECKPOINT),
    })
}

fn to_item(lease: &Lease) -> HashMap<String, AttributeValue> {
    let mut item = key_of(&lease.key);
    item.insert(LEASE_COUNTER.into(), n(lease.counter));
    if let Some(owner) = &lease.owner {
        item.insert(LEASE_OWNER.into(), s(owner));
    }
    item.insert(
        OWNER_SWITCHES.into(),
        n(lease.owner_switches_since_checkpoint),
    );
    item.insert(
        CHECKPOINT.into(),
        s(lease.checkpoint.as_deref().unwrap_or("TRIM_HORIZON")),
    );
    item.insert(
        CHECKPOINT_SUB.into(),
        n(lease.checkpoint_sub_sequence_number),
    );
    // DynamoDB refuses empty sets: the KCL leaves the attribute out.
    if !lease.parent_shard_ids.is_empty() {
        item.insert(
            PARENT_SHARD_IDS.into(),
            AttributeValue::Ss(lease.parent_shard_ids.clone()),
        );
    }
    if !lease.child_shard_ids.is_empty() {
        item.insert(
            CHILD_SHARD_IDS.into(),
            AttributeValue::Ss(lease.child_shard_ids.clone()),
        );
    }
    item
}

/// The outcome of one lease in `lease_renew_all`.
struct Renewed(Vec<(String, Result<(), Error>)>);

impl Encoder for Renewed {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let items: Vec<Term<'a>> = self
            .0
            .iter()
            .map(|(key, result)| {
                let outcome = match result {
                    Ok(()) => atoms::ok().encode(env),
                    Err(e) => (atoms::error(), Reason(e)).encode(env),
                };
                (key.as_str(), outcome).encode(env)
            })
            .collect();
        items.encode(env)
    }
}

/// Builds a lease client for `table`, acting as `worker_id`; replies
/// `{ref, {:ok, client}}`.
#[rustler::nif]
fn lease_client_new(
    config: KinesisConfig,
    table: String,
    worker_id: String,
    reply: ReplyTo,
) -> rustler::Atom {
    runtime::spawn_reply(reply, async move {
        let client = config.build_dynamodb_client().await;
        Ok(ResourceArc::new(LeaseClientResource {
            client,
            table,
            worker_id,
            held: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
        }))
    });
    atoms::ok()
}

/// Refuses a table migrated to KCL 3.x, creates the table (on-demand
/// capacity) when it is missing and waits until it is active. Replies
/// `{ref, {:ok, :exists | :created}}`.
#[rustler::nif]
fn lease_prepare(client: Client, reply: ReplyTo) -> rustler::Atom {
    runtime::spawn_reply(reply, async move { prepare(&client).await });
    atoms::ok()
}

async fn prepare(c: &LeaseClientResource) -> Result<rustler::Atom, Error> {
    check_not_kcl3(c).await?;
    c.count();
    let created = match c.client.describe_table().table_name(&c.table).send().await {
        Ok(_) => false,
        Err(e) if is_not_found(&e) => {
            c.count();
            let result = c
                .client
                .create_table()
                .table_name(&c.table)
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(LEASE_KEY)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .map_err(|e| Error::InvalidArgument(e.to_string()))?,
                )
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(LEASE_KEY)
                        .key_type(KeyType::Hash)
                        .build()
                        .map_err(|e| Error::InvalidArgument(e.to_string()))?,
                )
                .billing_mode(BillingMode::PayPerRequest)
                .send()
                .await;
            match result {
                Ok(_) => true,
                // Another worker created it first.
                Err(SdkError::ServiceError(e))
                    if aws_sdk_dynamodb::error::ProvideErrorMetadata::code(e.err())
                        == Some("ResourceInUseException") =>
                {
                    false
                }
                Err(e) => return Err(retry::classify(&e)),
            }
        }
        Err(e) => return Err(retry::classify(&e)),
    };
    // Wait until the table is active (real DynamoDB takes seconds).
    for _ in 0..120 {
        c.count();
        let out = c
            .client
            .describe_table()
            .table_name(&c.table)
            .send()
            .await
            .map_err(|e| retry::classify(&e))?;
        let status = out.table().and_then(|t| t.table_status()).cloned();
        if matches!(status, Some(TableStatus::Active) | None) {
            return Ok(if created {
                atoms::created()
            } else {
                atoms::exists()
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Error::Timeout)
}

/// KCL 3.x records its migration in `<table>-CoordinatorState`, item
/// `Migration3.0`, attribute `cv`. Any 3.x client version but the rollback
/// to 2.x means a leader assigns leases there: refuse it.
async fn check_not_kcl3(c: &LeaseClientResource) -> Result<(), Error> {
    let state_table = format!("{}{}", c.table, COORDINATOR_STATE_SUFFIX);
    c.count();
    let result = c
        .client
        .get_item()
        .table_name(&state_table)
        .key(COORDINATOR_STATE_KEY, s(MIGRATION_KEY))
        .consistent_read(true)
        .send()
        .await;
    match result {
        Ok(out) => {
            let version = out
                .item()
                .and_then(|item| item.get(CLIENT_VERSION))
                .and_then(|v| v.as_s().ok())
                .cloned();
            match version {
                Some(v) if v != "CLIENT_VERSION_2X" => Err(Error::Kcl3Table {
                    table: state_table,
                    version: v,
                }),
                _ => Ok(()),
            }
        }
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(retry::classify(&e)),
    }
}

/// Every lease of the table (a consistent, paginated scan); items that are
/// not KCL shard leases are left out. Replies `{ref, {:ok, [%Lease{}]}}`.
#[rustler::nif]
fn lease_list(client: Client, reply: ReplyTo) -> rustler::Atom {
    runtime::spawn_reply(reply, async move {
        let mut leases = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            client.count();
            let out = client
                .client
                .scan()
                .table_name(&client.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| retry::classify(&e))?;
            leases.extend(out.items().iter().filter_map(from_item));
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(leases),
            }
        }
    });
    atoms::ok()
}

/// Creates a lease unless one with its key exists. Replies `{ref, {:ok,
/// true}}` when it was created, `{ref, {:ok, false}}` when it existed.
#[rustler::nif]
fn lease_create(client: Client, lease: Lease, reply: ReplyTo) -> rustler::Atom {
    runtime::spawn_reply(reply, async move {
        client.count();
        let result = client
            .client
            .put_item()
            .table_name(&client.table)
            .set_item(Some(to_item(&lease)))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", LEASE_KEY)
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(retry::classify(&e)),
        }
    });
    atoms::ok()
}

/// Takes a lease seen with `counter` and `owner`: sets the owner to this
/// worker and the counter to `counter + 1`, conditional on the counter.
/// Replies `{ref, {:ok, new_counter}}`, or `{:error, :lease_lost}` when
/// someone wrote it meanwhile. From then on the lease is held.
#[rustler::nif]
fn lease_take(
    client: Client,
    key: String,
    counter: u64,
    owner: Option<String>,
    reply: ReplyTo,
) -> rustler::Atom {
    runtime::spawn_reply(reply, async move {
        let switch = owner.as_deref() != Some(client.worker_id.as_str()) && owner.is_some();
        let update = if switch {
            "SET #o = :me, #c = :next ADD #sw :one"
        } else {
            "SET #o = :me, #c = :next"
        };
        let mut request = client
            .client
            .update_item()
            .table_name(&client.table)
            .set_key(Some(key_of(&key)))
            .update_expression(update)
            .condition_expression("#c = :counter")
            .expression_attribute_names("#o", LEASE_OWNER)
            .expression_attribute_names("#c", LEASE_COUNTER)
            .expression_attribute_values(":me", s(&client.worker_id))
            .expression_attribute_values(":next", n(counter + 1))
            .expression_attribute_values(":counter", n(counter));
        if switch {
            request = request
                .expression_attribute_names("#sw", OWNER_SWITCHES)
                .expression_attribute_values(":one", n(1));
        }
        client.count();
        match request.send().await {
            Ok(_) => {
                client.hold(&key, counter + 1);
                Ok(counter + 1)
            }
            Err(e) if is_condition_failure(&e) => Err(Error::LeaseLost),
            Err(e) => Err(retry::classify(&e)),
        }
    });
    atoms::ok()
}

/// Renews every held lease at once (counter + 1, conditional on the counter
/// and the owner). Replies `{ref, {:ok, [{key, :ok | {:error, reason}}]}}`;
/// a lease answered `{:error, :lease_lost}` is no longer held.
#[rustler::nif]
fn lease_renew_all(client: Client, reply: ReplyTo) -> rustler::Atom {
    runtime::spawn_reply(reply, async move {
        let mut tasks = tokio::task::JoinSet::new();
        for (key, held) in client.held_keys() {
            let client = client.clone();
            tasks.spawn(async move {
                let result = write_held(&client, &key, &held, |r| {
                    r.update_expression("SET #c = :next")
                })
                .await;
                (key, result)
            });
        }
        let mut outcomes = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(outcome) = joined {
                outcomes.push(outcome);
            }
        }
        Ok(Renewed(outcomes))
    });
    atoms::ok()
}

type Update = aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;

/// A conditional write on a lease this worker holds, counting its counter
/// on. A lease found lost is no longer held (unless it was taken again
/// meanwhile: only the hold this write was made under is dropped).
///
/// The condition can fail on a write of this worker's own: an earlier one
/// that DynamoDB applied but whose answer never came (a timeout, a dropped
/// connection), so the counter moved without this worker knowing. As the
/// KCL does, the item is then read: owned by this worker at the next
/// counter, the lease is still held, and the write is made again at that
/// counter, once.
async fn write_held<F>(
    client: &LeaseClientResource,
    key: &str,
    hold: &Arc<tokio::sync::Mutex<Held>>,
    build: F,
) -> Result<(), Error>
where
    F: Fn(Update) -> Update,
{
    let mut held = hold.lock().await;
    let mut result = conditional_write(client, key, held.counter, &build).await;
    if matches!(result, Err(Error::LeaseLost)) && own_write_landed(client, key, held.counter).await
    {
        held.counter += 1;
        result = conditional_write(client, key, held.counter, &build).await;
    }
    match &result {
        Ok(()) => held.counter += 1,
        Err(Error::LeaseLost) => client.forget_hold(key, hold),
        Err(_) => {}
    }
    result
}

/// Whether the lease item is this worker's at `counter + 1`: a write of its
/// own at `counter` was applied. Any error reads as "no".
async fn own_write_landed(client: &LeaseClientResource, key: &str, counter: u64) -> bool {
    client.count();
    let read = client
        .client
        .get_item()
        .table_name(&client.table)
        .set_key(Some(key_of(key)))
        .consistent_read(true)
        .send()
        .await;
    let lease = read.ok().and_then(|out| out.item().and_then(from_item));
    lease.is_some_and(|l| {
        l.owner.as_deref() == Some(client.worker_id.as_str()) && l.counter == counter + 1
    })
}

/// An UpdateItem on a held lease: `build` adds its update expression (with
/// `#c = :next` among it), conditional on the counter and this owner.
async fn conditional_write<F>(
    client: &LeaseClientResource,
    key: &str,
    counter: u64,
    build: &F,
) -> Result<(), Error>
where
    F: Fn(Update) -> Update,
{
    let request = client
        .client
        .update_item()
        .table_name(&client.table)
        .set_key(Some(key_of(key)))
        .condition_expression("#c = :counter AND #o = :me")
        .expression_attribute_names("#c", LEASE_COUNTER)
        .expression_attribute_names("#o", LEASE_OWNER)
        .expression_attribute_values(":counter", n(counter))
        .expression_attribute_values(":next", n(counter + 1))
        .expression_attribute_values(":me", s(&client.worker_id));
    client.count();
    match build(request).send().await {
        Ok(_) => Ok(()),
        Err(e) if is_condition_failure(&e) => Err(Error::LeaseLost),
        Err(e) => Err(retry::classify(&e)),
    }
}

/// Stores a checkpoint in a held lease (a sequence number, or
/// `TRIM_HORIZON`, `LATEST`, `SHARD_END`), resetting
/// `ownerSwitchesSinceCheckpoint`. Replies `{ref, :ok}`-shaped
/// `{ref, {:ok, :ok}}`, or `{:error, :lease_lost}` for a lease not held.
#[rustler::nif]
fn lease_checkpoint(
    client: Client,
    key: String,
    checkpoint: String,
    sub_sequence_number: u64,
    reply: ReplyTo,
) -> rustler::Atom {
    runtime::spawn_reply(reply, async move {
        let hold = client.held(&key).ok_or(Error::LeaseLost)?;
        let result = write_held(&client, &key, &hold, |r| {
            r.update_expression(
                "SET #c = :next, #cp = :cp, #sub = :sub, #sw = :zero REMOVE #pc, #psub",
            )
            .expression_attribute_names("#cp", CHECKPOINT)
            .expression_attribute_names("#sub", CHECKPOINT_SUB)
            .expression_attribute_names("#sw", OWNER_SWITCHES)
            .expression_attribute_names("#pc", PENDING_CHECKPOINT)
            .expression_attribute_names("#psub", PENDING_CHECKPOINT_SUB)
            .expression_attribute_values(":cp", s(&checkpoint))
            .expression_attribute_values(":sub", n(sub_sequence_number))
            .expression_attribute_values(":zero", n(0))
        })
        .await;
        result.map(|()| atoms::ok())
    });
    atoms::ok()
}

/// Gives a held lease up (removes the owner, counter + 1), so another worker
/// takes it at once. Replies `{ref, {:ok, :ok}}`; the lease is no longer
/// held whatever the outcome.
#[rustler::nif]
fn lease_release(client: Client, key: String, reply: ReplyTo) -> rustler::Atom {
    runtime::spawn_reply(reply, async move {
        let hold = client.held(&key).ok_or(Error::LeaseLost)?;
        let result = write_held(&client, &key, &hold, |r| {
            r.update_expression("SET #c = :next REMOVE #o")
        })
        .await;
        client.forget_hold(&key, &hold);
        result.map(|()| atoms::ok())
    });
    atoms::ok()
}

/// Stops holding a lease without writing it (it expired locally).
#[rustler::nif]
fn lease_forget(client: Client, key: String) -> rustler::Atom {
    client.forget(&key);
    atoms::ok()
}

/// Deletes the lease of a finished shard: only when its checkpoint is
/// `SHARD_END`. Replies `{ref, {:ok, true | false}}` (false: not finished,
/// or already gone).
#[rustler::nif]
fn lease_delete(client: Client, key: String, reply: ReplyTo) -> rustler::Atom {
    runtime::spawn_reply(reply, async move {
        client.count();
        let result = client
            .client
            .delete_item()
            .table_name(&client.table)
            .set_key(Some(key_of(&key)))
            .condition_expression("#cp = :end")
            .expression_attribute_names("#cp", CHECKPOINT)
            .expression_attribute_values(":end", s("SHARD_END"))
            .send()
            .await;
        client.forget(&key);
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(retry::classify(&e)),
        }
    });
    atoms::ok()
}

/// DynamoDB requests made by this client so far.
#[rustler::nif]
fn lease_calls(client: Client) -> u64 {
    client.calls.load(Ordering::Relaxed)
}

/// The keys of the leases held, as this client knows them.
#[rustler::nif]
fn lease_held(client: Client) -> Vec<String> {
    let mut keys: Vec<String> = client.held_keys().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    keys
}
