//! Watches the pods bound to this kubelet's nodes and hands each to its own worker.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::Shared;
use super::worker::{self, PodUpdate};

struct WorkerHandle {
    updates: watch::Sender<PodUpdate>,
    task: JoinHandle<()>,
}

pub(crate) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let nodes: HashSet<String> = shared
        .config
        .nodes
        .iter()
        .map(|node| node.name.clone())
        .collect();
    let api: Api<Pod> = Api::all(shared.client.clone());
    let mut events = watcher(api, watcher::Config::default().fields("spec.nodeName!="))
        .default_backoff()
        .boxed();
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let (finished_sender, mut finished) = mpsc::unbounded_channel::<String>();
    let workers_shutdown = shutdown.clone();
    // UIDs seen during a relist; workers of pods missing from it have lost their pod.
    let mut relisted: Option<HashSet<String>> = None;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Init)) => relisted = Some(HashSet::new()),
                Some(Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod))) => {
                    let on_our_node = pod.spec.as_ref().and_then(|spec| spec.node_name.as_ref()).is_some_and(|node| nodes.contains(node));
                    let Some(uid) = pod.uid().filter(|_| on_our_node) else { continue };
                    if let Some(seen) = relisted.as_mut() {
                        seen.insert(uid.clone());
                    }
                    match workers.get(&uid) {
                        Some(worker) => {
                            worker.updates.send_replace(PodUpdate::Present(Box::new(pod)));
                        }
                        None => {
                            let (updates, receiver) = watch::channel(PodUpdate::Present(Box::new(pod)));
                            let task = tokio::spawn(worker::run(shared.clone(), receiver, workers_shutdown.clone(), finished_sender.clone()));
                            workers.insert(uid, WorkerHandle { updates, task });
                        }
                    }
                }
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Some(worker) = pod.uid().and_then(|uid| workers.get(&uid)) {
                        worker.updates.send_replace(PodUpdate::Gone);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let seen = relisted.take().unwrap_or_default();
                    for (uid, worker) in &workers {
                        if !seen.contains(uid) {
                            worker.updates.send_replace(PodUpdate::Gone);
                        }
                    }
                }
                Some(Err(error)) => tracing::debug!("pod watch: {error}"),
                None => break,
            },
            Some(uid) = finished.recv() => {
                workers.remove(&uid);
            }
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    // Workers see the shutdown themselves and stop their containers.
    for (_, worker) in workers {
        let _ = worker.task.await;
    }
}
