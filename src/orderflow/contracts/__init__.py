"""orderflow's event contracts: the AsyncAPI document generated from the payload models,
and the recorded schemas each event version must stay compatible with."""

from orderflow.contracts.asyncapi import MESSAGES, MessageSpec, asyncapi_document, to_yaml

__all__ = ["MESSAGES", "MessageSpec", "asyncapi_document", "to_yaml"]
