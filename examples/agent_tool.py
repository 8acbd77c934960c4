"""gpu-agent as tools of a tool-calling agent (LangChain's create_agent, a LangGraph graph).

    .venv/bin/python examples/agent_tool.py

The agent here is driven by a scripted chat model so that the example runs offline and the
same every time; swap in any chat model with tool calling (e.g. `ChatOpenAI(model=...)` from
langchain-openai) and it decides the calls itself. The tools own the graph's thread ids, so an
agent never sees an interrupt: a request the council splits comes back as
`pending_human_approval`, with the command a human runs to decide.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from graph.orchestrator import Orchestrator
from graph.tools import gpu_tools


class ScriptedModel(GenericFakeChatModel):
    """Plays back the messages it was given; a real model would choose them."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self


def tool_call(name: str, args: dict[str, Any], n: int) -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[{"name": name, "args": args, "id": f"call-{n}", "type": "tool_call"}],
    )


def main(state_dir: str) -> None:
    orch = Orchestrator(state_dir)
    try:
        tools = gpu_tools(orch)
        script = iter(
            [
                tool_call(
                    "request_gpus",
                    {"project": "vision", "count": 2, "hours": 4, "gpu_type": "A100"},
                    1,
                ),
                tool_call("gpu_status", {}, 2),
                AIMessage(content="Got 2 A100s; releasing them now that the test run is done."),
            ]
        )
        agent = create_agent(ScriptedModel(messages=script), tools)
        result = agent.invoke({"messages": [HumanMessage("I need 2 A100s for 4 hours for vision")]})
        for message in result["messages"]:
            if isinstance(message, ToolMessage):
                print(f"{message.name} -> {json.dumps(json.loads(message.text))[:200]}")
            elif isinstance(message, AIMessage) and message.content:
                print(f"agent: {message.content}")
        placed = json.loads(
            next(
                m.text
                for m in result["messages"]
                if isinstance(m, ToolMessage) and m.name == "request_gpus"
            )
        )
        released = tools[1].invoke({"allocation_id": placed["allocation_id"]})
        print(
            f"release_gpus -> {released['reason']} after {released['hours'] * 3600:.2f} s, "
            f"${released['cost_usd']:.4f}"
        )
        for monitor in tools[0].metadata["monitors"]:  # type: ignore[index]
            monitor.join()
    finally:
        orch.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="gpu-agent-agent-") as tmp:
        main(tmp)
