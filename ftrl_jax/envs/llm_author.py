"""The LLM author: each of the five stages done by prompting a chat model, as FTRL does.

Any OpenAI-compatible `/v1/chat/completions` endpoint works (vLLM, SGLang, llama.cpp server,
hosted APIs); requests go through the official `openai` SDK. Every answer must be JSON of the
stage's shape and pass the same checks `construct` applies; a failing answer is sent back with the
problem appended to the conversation, a bounded number of times, then the stage fails with
StageError naming the last problem (the environment is dropped). Endpoint failures raise
ChatError instead, which stops a build: they say nothing about the environment.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, Callable, Mapping, Sequence, TypeVar

import openai

from ftrl_jax.envs import rewards
from ftrl_jax.envs import sandbox as sandbox_lib
from ftrl_jax.envs.stages import (Case, Complexity, Scenario, StageError, SubQuestion, ToolDocument,
                                  check_codes, check_scenario, check_toolset)

T = TypeVar("T")

# The SDK refuses to start without a key; servers without auth get this one and no Authorization header.
_NO_KEY = "no-key"


class ChatError(RuntimeError):
    """The chat endpoint could not be reached or answered with an error."""


class ChatClient:
    """Client for an OpenAI-compatible chat-completions endpoint, through the `openai` SDK.

    base_url is the API root, e.g. 'http://127.0.0.1:8000/v1'; an empty api_key sends no
    Authorization header. Each request waits at most `timeout` seconds; connection errors, timeouts,
    HTTP 408/409/429 and 5xx are retried `transient_retries` times with the SDK's exponential backoff
    (0.5 s doubling up to 8 s, or the server's Retry-After when it asks for at most two minutes).
    `http_client` replaces the SDK's connection pool (an `httpx.Client`, e.g. with a mock transport).
    Raises ValueError for a base_url without http(s):// or a negative setting.
    """

    def __init__(self, base_url: str, api_key: str = "", model: str = "", timeout: float = 120.0,
                 temperature: float = 0.7, max_tokens: int | None = 4096, transient_retries: int = 3,
                 http_client: Any = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if transient_retries < 0 or timeout <= 0:
            raise ValueError(f"need transient_retries >= 0 and timeout > 0; got {transient_retries}, {timeout}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.transient_retries = transient_retries
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key or _NO_KEY, timeout=timeout,
                                     max_retries=transient_retries, http_client=http_client)

    def complete(self, messages: Sequence[Mapping[str, str]], seed: int | None = None) -> str:
        """The assistant message text for `messages`; raises ChatError."""
        options: dict[str, Any] = {}
        if self.max_tokens is not None:
            options["max_tokens"] = self.max_tokens
        if seed is not None:
            options["seed"] = seed  # honoured by servers that support it; ignored by the rest
        if not self.api_key:
            options["extra_headers"] = {"Authorization": openai.Omit()}
        tries = self.transient_retries + 1
        try:
            completion = self._client.chat.completions.create(model=self.model, messages=list(messages),
                                                              temperature=self.temperature, **options)
        except openai.APIStatusError as exc:
            raise ChatError(f"{self.url} answered HTTP {exc.status_code}: {exc.response.text[:300]}") from None
        except openai.APITimeoutError:
            raise ChatError(f"{self.url} did not answer within {self.timeout:g} s ({tries} tries); check that "
                            "the server is running and not overloaded (fewer --author_threads)") from None
        except openai.APIConnectionError as exc:
            cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
            raise ChatError(f"cannot reach {self.url} ({tries} tries): {exc}{cause}; check --base_url and that "
                            "the server is running") from None
        except ValueError as exc:  # a body labelled JSON that is not
            raise ChatError(f"{self.url} did not answer with JSON ({exc})") from None
        if not isinstance(completion, openai.BaseModel):  # the SDK hands back other bodies as text
            raise ChatError(f"{self.url} did not answer with JSON: {str(completion)[:300]!r}; check that "
                            "--base_url is the API root (it should end in /v1)")
        return _message_text(completion.to_dict(), self.url)


def _message_text(body: Any, url: str) -> str:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ChatError(f"{url} answered without choices[0].message.content: {str(body)[:300]}") from None
    if not isinstance(content, str):
        raise ChatError(f"{url} answered with non-text content: {str(content)[:300]}")
    return content


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON object in a model reply: a ```json fence, or the outermost {...}; ValueError if none."""
    fenced = _FENCE.search(text)
    candidate = fenced.group(1) if fenced else text
    start, end = candidate.find("{"), candidate.rfind("}")
    if start < 0 or end < start:
        raise ValueError("the reply contains no JSON object")
    try:
        return json.loads(candidate[start:end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply is not valid JSON: {exc}") from None


# --- prompts ---------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You build environments for training language models to use tools. Facts may be invented but "
    "must be consistent. Always answer with one JSON object and nothing else.")

DOMAINS = ("geography", "music", "film", "sports", "literature", "science history", "technology companies",
           "cuisine", "architecture", "astronomy", "botany", "maritime history", "painting", "politics",
           "medicine", "education", "transportation", "economics", "mythology", "video games")

_KIND_RULES = {
    "single_hop": "exactly 1 sub-question, with no dependencies",
    "parallel_single_hop": "{lo} to {hi} independent sub-questions (no dependencies); the question asks "
                           "for all their answers (do not combine them into a sum or comparison)",
    "multi_hop": "one chain of {lo} to {hops} sub-questions; each depends on the previous one and its "
                 "subject is exactly the previous answer",
    "parallel_multi_hop": "{lo} to {hi} independent chains, at least one of 2 or more sub-questions "
                          "(at most {hops} per chain); inside a chain each subject is exactly the previous "
                          "answer; the question asks for the answer of every chain",
}

_DECOMPOSE_PROMPT = """Write one {kind} question about {domain} and decompose it.
Structure: {rule}.
Return JSON: {{"question": str, "sub_questions": [{{"id": "q1", "question": str, "answer": str,
"subject": str, "depends_on": [ids], "topic": str}}]}}
Rules:
- "subject" is the exact input a tool needs: for a sub-question without dependencies it must appear
  verbatim in the question; for a dependent one it must equal the answer it depends on.
- No answer may appear in the question: a user must only learn it by calling tools.
- Answers are short strings without ", " (use digits for numbers).
- "topic" names what is asked in 1-3 words (e.g. "birth year")."""

_DOCUMENTS_PROMPT = """Sub-questions of the question "{question}":
{subs}
For each sub-question write the document of one tool that answers it, and the call that does.
Return JSON: {{"documents": [{{"sub_question": id, "name": snake_case str, "description": str,
"parameters": JSON schema with "type": "object", "properties" (each with "type" and "description")
and "required", "arguments": the call's arguments as an object}}]}}
The call's arguments must contain the sub-question's subject string verbatim."""

_INTEGRATE_PROMPT = """Tool documents for the question "{question}":
{documents}
Merge documents whose functionality overlaps into one tool (for example one lookup tool with a
parameter selecting the kind of fact); keep the others as they are. Tool names must be unique.
Return JSON: {{"tools": [{{"name": str, "description": str, "parameters": JSON schema,
"calls": {{sub_question_id: arguments}}}}]}}
Every sub-question id ({ids}) must appear in the calls of exactly one tool, and each call's
arguments must contain that sub-question's subject verbatim."""

_SCALE_PROMPT = """Tools for the question "{question}":
{tools}
Make the toolset more realistic with these four strategies:
- functional generalization (level {fg}/3): {fg_text}
- parameter expansion (level {pe}/3): {pe_text}
- parameter type generalization (level {pt}/3): {pt_text}
- toolset extension (level {te}/3): add {distractors} distractor tools that answer none of the
  sub-questions (give them "calls": {{}}).
Keep every existing call working: the calls of each sub-question must still be valid arguments.
Return JSON: {{"tools": [{{"name": str, "description": str, "parameters": JSON schema,
"calls": {{sub_question_id: arguments}}}}]}}"""

_FG_TEXT = ("keep each tool answering only its own query", "let each tool answer similar queries about other inputs",
            "let each tool answer a broader family of queries, described in its description",
            "make each tool a general service covering many related queries, with a selector where useful")
_PE_TEXT = ("add no optional parameters", "add 1 optional parameter per tool",
            "add 2 to 3 optional parameters per tool", "add 4 to 6 optional parameters per tool")
_PT_TEXT = ("use only string and boolean parameters", "use enums where values are fixed",
            "use enums, integers and numbers with bounds", "use enums, numbers, arrays and objects")
_DISTRACTORS = {0: 0, 1: 2, 2: 4, 3: 6}

_DEPLOY_PROMPT = """Tools for the question "{question}", with the calls each tool must answer:
{tools}
Write Python code for every tool: a top-level function with the tool's name and parameters as
keyword arguments (optional ones with defaults), standard library only, deterministic (no
randomness, clock or network). For each listed call it must return a result whose text contains
the expected answer; for invalid input it returns an informative error string or
{{"error": ...}} saying what was wrong and what is allowed. Never repeat an argument's value in a
result or an error (name the parameter instead): a wrong call must not return text that contains a
right answer. A result carries only the field asked for.
Return JSON: {{"codes": {{tool_name: python_source}}}}"""


def _as_mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _as_list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a JSON list, got {type(value).__name__}")
    return value


def _text(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what}.{key} must be a non-empty string")
    return value.strip()


def _subject_errors(scenario: Scenario, tools: Sequence[ToolDocument]) -> list[str]:
    """Each sub-question's call must pass its subject (from the question or an earlier answer)."""
    by_id = {sq.id: sq for sq in scenario.sub_questions}
    errors = []
    for tool in tools:
        for case in tool.cases:
            sq = by_id.get(case.sub_question or "")
            if sq is not None and sq.subject not in json.dumps(dict(case.arguments), ensure_ascii=False):
                errors.append(f"the call of {sq.id!r} ({tool.name}) must pass the subject {sq.subject!r} "
                              "verbatim in its arguments")
    return errors


def _tools_from(obj: Any, scenario: Scenario, what: str) -> list[ToolDocument]:
    """ToolDocuments from {"tools": [{name, description, parameters, calls}]}."""
    by_id = {sq.id: sq for sq in scenario.sub_questions}
    tools = []
    for i, raw in enumerate(_as_list(_as_mapping(obj, "the reply").get("tools"), "tools")):
        raw = _as_mapping(raw, f"tools[{i}]")
        calls = _as_mapping(raw.get("calls", {}), f"tools[{i}].calls")
        cases = []
        for sq_id, arguments in calls.items():
            if sq_id not in by_id:
                raise ValueError(f"tools[{i}].calls names unknown sub-question {sq_id!r}; use {sorted(by_id)}")
            cases.append(Case(dict(_as_mapping(arguments, f"tools[{i}].calls[{sq_id!r}]")),
                              by_id[sq_id].answer, "result", sq_id))
        tools.append(ToolDocument(_text(raw, "name", f"{what}[{i}]"), _text(raw, "description", f"{what}[{i}]"),
                                  dict(_as_mapping(raw.get("parameters"), f"tools[{i}].parameters")),
                                  tuple(cases)))
    return tools


def _tools_json(tools: Sequence[ToolDocument], scenario: Scenario, with_answers: bool) -> str:
    by_id = {sq.id: sq for sq in scenario.sub_questions}
    listed = []
    for tool in tools:
        entry: dict[str, Any] = {"name": tool.name, "description": tool.description,
                                 "parameters": dict(tool.parameters)}
        calls = {c.sub_question: dict(c.arguments) for c in tool.cases if c.sub_question}
        if with_answers:
            entry["calls"] = [{"arguments": args, "expected_answer": by_id[q].answer} for q, args in calls.items()]
        else:
            entry["calls"] = calls
        listed.append(entry)
    return json.dumps(listed, indent=1, ensure_ascii=False)


class LLMAuthor:
    """The five stages by prompting a chat model; answers checked, bad ones sent back for repair.

    sandbox: if given, stage 5 runs every sub-question's call on the written code and sends the
    model any call whose output lacks the expected answer (FTRL's verification, inside the stage).
    """

    def __init__(self, client: ChatClient, max_retries: int = 3,
                 sandbox: sandbox_lib.Sandbox | None = None, domains: Sequence[str] = DOMAINS):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.client = client
        self.max_retries = max_retries
        self.sandbox = sandbox
        self.domains = tuple(domains)

    def _ask(self, stage: str, prompt: str, parse: Callable[[Any], T], rng: random.Random) -> T:
        """Prompts until `parse(json)` succeeds, feeding each failure back; StageError when spent."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        problem = ""
        for _ in range(self.max_retries + 1):
            # ChatError propagates: an endpoint that is down fails the build, not one environment.
            reply = self.client.complete(messages, seed=rng.randrange(2 ** 31))
            try:
                return parse(extract_json(reply))
            except (ValueError, StageError) as exc:
                problem = exc.message if isinstance(exc, StageError) else str(exc)
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"That answer cannot be used: {problem}\n"
                                                     "Reply again with the corrected JSON object only."}]
        raise StageError(stage, f"no usable answer after {self.max_retries + 1} attempts; last problem: {problem}")

    # stage 1
    def decompose(self, kind: str, complexity: Complexity, rng: random.Random) -> Scenario:
        """Asks for a question of `kind` in a random domain, decomposed into sub-questions."""
        rule = _KIND_RULES[kind].format(lo=2, hi=complexity.max_parallel, hops=complexity.max_hops)
        prompt = _DECOMPOSE_PROMPT.format(kind=kind.replace("_", "-"), domain=rng.choice(self.domains), rule=rule)

        def parse(obj: Any) -> Scenario:
            obj = _as_mapping(obj, "the reply")
            subs = []
            for i, raw in enumerate(_as_list(obj.get("sub_questions"), "sub_questions")):
                raw = _as_mapping(raw, f"sub_questions[{i}]")
                depends = _as_list(raw.get("depends_on", []), f"sub_questions[{i}].depends_on")
                subs.append(SubQuestion(
                    id=_text(raw, "id", f"sub_questions[{i}]"),
                    question=_text(raw, "question", f"sub_questions[{i}]"),
                    answer=str(raw.get("answer", "")).strip(), subject=str(raw.get("subject", "")).strip(),
                    depends_on=tuple(str(d) for d in depends), relation=str(raw.get("topic", ""))))
            scenario = Scenario(kind, _text(obj, "question", "the reply"), tuple(subs))
            errors = check_scenario(scenario)
            if errors:
                raise ValueError("; ".join(errors))
            return scenario

        return self._ask("decompose", prompt, parse, rng)

    # stage 2
    def write_documents(self, scenario: Scenario, rng: random.Random) -> list[ToolDocument]:
        """One tool document and call per sub-question."""
        by_id = {sq.id: sq for sq in scenario.sub_questions}
        subs = "\n".join(f"- {sq.id}: {sq.question} (subject: {sq.subject!r}, answer: {sq.answer!r})"
                         for sq in scenario.sub_questions)

        def parse(obj: Any) -> list[ToolDocument]:
            documents = []
            for i, raw in enumerate(_as_list(_as_mapping(obj, "the reply").get("documents"), "documents")):
                raw = _as_mapping(raw, f"documents[{i}]")
                sq_id = raw.get("sub_question")
                if sq_id not in by_id:
                    raise ValueError(f"documents[{i}].sub_question {sq_id!r} is not one of {sorted(by_id)}")
                case = Case(dict(_as_mapping(raw.get("arguments"), f"documents[{i}].arguments")),
                            by_id[sq_id].answer, "result", sq_id)
                documents.append(ToolDocument(_text(raw, "name", f"documents[{i}]"),
                                              _text(raw, "description", f"documents[{i}]"),
                                              dict(_as_mapping(raw.get("parameters"), f"documents[{i}].parameters")),
                                              (case,)))
            errors = check_toolset(scenario, documents, unique_names=False) + _subject_errors(scenario, documents)
            if errors:
                raise ValueError("; ".join(errors))
            return documents

        return self._ask("write_documents", _DOCUMENTS_PROMPT.format(question=scenario.question, subs=subs),
                         parse, rng)

    def _toolset_stage(self, stage: str, prompt: str, scenario: Scenario, rng: random.Random,
                       min_distractors: int = 0) -> list[ToolDocument]:
        def parse(obj: Any) -> list[ToolDocument]:
            tools = _tools_from(obj, scenario, "tools")
            errors = check_toolset(scenario, tools) + _subject_errors(scenario, tools)
            distractors = sum(1 for t in tools if not t.cases)
            if distractors < min_distractors:
                errors.append(f"add at least {min_distractors} distractor tools with empty calls "
                              f"(found {distractors})")
            if errors:
                raise ValueError("; ".join(errors))
            return tools

        return self._ask(stage, prompt, parse, rng)

    # stage 3
    def integrate(self, scenario: Scenario, documents: Sequence[ToolDocument],
                  rng: random.Random) -> list[ToolDocument]:
        """Asks the model to merge overlapping documents, keeping every call."""
        prompt = _INTEGRATE_PROMPT.format(question=scenario.question,
                                          documents=_tools_json(documents, scenario, with_answers=False),
                                          ids=", ".join(sq.id for sq in scenario.sub_questions))
        return self._toolset_stage("integrate", prompt, scenario, rng)

    # stage 4
    def scale(self, scenario: Scenario, tools: Sequence[ToolDocument], complexity: Complexity,
              rng: random.Random) -> list[ToolDocument]:
        """Asks the model to apply the four complexity strategies at their levels."""
        c = complexity
        distractors = _DISTRACTORS[c.toolset_extension]
        prompt = _SCALE_PROMPT.format(
            question=scenario.question, tools=_tools_json(tools, scenario, with_answers=False),
            fg=c.functional_generalization, fg_text=_FG_TEXT[c.functional_generalization],
            pe=c.parameter_expansion, pe_text=_PE_TEXT[c.parameter_expansion],
            pt=c.parameter_type_generalization, pt_text=_PT_TEXT[c.parameter_type_generalization],
            te=c.toolset_extension, distractors=distractors)
        return self._toolset_stage("scale", prompt, scenario, rng, min_distractors=distractors)

    # stage 5
    def deploy(self, scenario: Scenario, tools: Sequence[ToolDocument], rng: random.Random) -> dict[str, str]:
        """Asks for the code of every tool; with a sandbox, also checks the answers it returns."""
        prompt = _DEPLOY_PROMPT.format(question=scenario.question,
                                       tools=_tools_json(tools, scenario, with_answers=True))

        def parse(obj: Any) -> dict[str, str]:
            codes = _as_mapping(_as_mapping(obj, "the reply").get("codes"), "codes")
            codes = {str(name): source for name, source in codes.items()}
            errors = (check_codes(tools, codes, parse=True) or self._answer_errors(tools, codes)
                      or self._leak_errors(tools, codes))
            if errors:
                raise ValueError("; ".join(errors))
            return codes

        return self._ask("deploy", prompt, parse, rng)

    def _leak_errors(self, tools: Sequence[ToolDocument], codes: Mapping[str, str]) -> list[str]:
        """Wrong calls whose output contains an expected answer (a tool that repeats its arguments).

        Each parameter of each tool is given each expected answer of the environment, over each of the tool's
        own calls (or no other arguments); a probe equal to one of the tool's own calls is a right call and is
        skipped. FTRL's reward reads tool outputs, so such a leak would reward a wrong call.
        """
        if self.sandbox is None:
            return []
        answers = sorted({c.answer for t in tools for c in t.cases if c.sub_question and c.answer.strip()})
        probes: list[tuple[str, dict[str, Any]]] = []
        for tool in tools:
            own = [dict(c.arguments) for c in tool.cases]
            for base in own or [{}]:
                for parameter in (tool.parameters.get("properties") or {}):
                    for answer in answers:
                        probe = {**base, parameter: answer}
                        if probe not in own and (tool.name, probe) not in probes:
                            probes.append((tool.name, probe))
        outputs = self.sandbox.call_many([sandbox_lib.ToolRequest(codes, name, probe) for name, probe in probes])
        errors = []
        for (name, probe), output in zip(probes, outputs):
            leaked = next((a for a in answers if rewards.answer_matches(output, a)), None)
            if leaked is not None:
                errors.append(f"{name}(**{probe}) is a wrong call, yet its output {output[:200]!r} contains the "
                              f"expected answer {leaked!r}: results and errors must not repeat argument values")
        return errors[:5]

    def _answer_errors(self, tools: Sequence[ToolDocument], codes: Mapping[str, str]) -> list[str]:
        if self.sandbox is None:
            return []
        calls = [(t.name, c) for t in tools for c in t.cases if c.sub_question]
        outputs = self.sandbox.call_many([sandbox_lib.ToolRequest(codes, name, dict(c.arguments))
                                          for name, c in calls])
        return [f"{name}(**{dict(c.arguments)}) returned {output[:200]!r}, which does not contain the "
                f"expected answer {c.answer!r}"
                for (name, c), output in zip(calls, outputs) if not rewards.answer_matches(output, c.answer)]

