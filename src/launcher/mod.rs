//! The launcher: spawns local ranks, hosts or joins the rendezvous store, watches and tears down.
