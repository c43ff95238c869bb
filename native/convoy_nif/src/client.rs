//! The Kinesis client as a resource: built once per queue on the runtime,
//! then shared by its producer, pollers and admin calls.

use rustler::ResourceArc;

use crate::kinesis_config::KinesisConfig;
use crate::reply::ReplyTo;
use crate::runtime;

pub struct ClientResource {
    pub client: aws_sdk_kinesis::Client,
}

#[rustler::resource_impl]
impl rustler::Resource for ClientResource {}

/// Builds a client; replies `{ref, {:ok, client}}`. Resolving
/// credentials may read files or call an instance-metadata endpoint, so it
/// runs on the runtime, never on a scheduler.
#[rustler::nif]
fn client_new(config: KinesisConfig, reply: ReplyTo) -> rustler::Atom {
    runtime::spawn_reply(reply, async move {
        let client = config.build_client().await;
        Ok(ResourceArc::new(ClientResource { client }))
    });
    crate::atoms::ok()
}
