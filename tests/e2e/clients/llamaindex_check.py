"""Drive the endpoint with LlamaIndex's OpenAILike; print what came back as JSON (run in .venv-clients).

    python llamaindex_check.py BASE_URL API_KEY MODEL
"""

import json
import sys

from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

base_url, api_key, model = sys.argv[1:4]
llm = OpenAILike(api_base=base_url, api_key=api_key, model=model, is_chat_model=True, temperature=0,
                 max_tokens=20, max_retries=0)
messages = [ChatMessage(role="user", content="Tell me about the city of Lyon.")]
print(json.dumps({
    "chat": llm.chat(messages).message.content,
    "stream_chat": "".join(chunk.delta or "" for chunk in llm.stream_chat(messages)),
}))
