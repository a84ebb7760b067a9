"""Drive the endpoint with LangChain's ChatOpenAI; print what came back as JSON (run in .venv-clients).

    python langchain_check.py BASE_URL API_KEY MODEL
"""

import json
import sys

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

base_url, api_key, model = sys.argv[1:4]
llm = ChatOpenAI(base_url=base_url, api_key=api_key, model=model, temperature=0, max_tokens=40, max_retries=0)
question = "Tell me about the city of Lyon."


@tool
def get_weather(city: str, days: int) -> str:
    """Weather forecast for a city."""
    return "sunny"


class City(BaseModel):
    name: str = Field(max_length=30)
    population: int = Field(ge=0)


forced = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
    "What will the weather be in Paris over the next 3 days?")
city = llm.with_structured_output(City, method="json_schema").invoke("Describe the largest city in France.")
print(json.dumps({
    "invoke": llm.invoke(question).content,
    "stream": "".join(chunk.content for chunk in llm.stream(question)),
    "tool_calls": [{"name": c["name"], "args": c["args"]} for c in forced.tool_calls],
    "structured": city.model_dump(),
}))
