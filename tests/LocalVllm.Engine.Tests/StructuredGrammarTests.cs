using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using Json.Schema;
using LocalVllm.Engine.Structured;
using LocalVllm.Engine.Text.Tokenization;

namespace LocalVllm.Engine.Tests;

/// <summary>
/// The grammar engine on its own: masks against the plain definition (a token is allowed exactly when the matcher can
/// advance by its bytes), schemas against an independent validator (JsonSchema.Net), number bounds and dates against
/// direct computation, and bad constraints.
/// </summary>
public class StructuredGrammarTests
{
    private static readonly Lazy<ModelTokenizer> Llama2 = new(() => ModelTokenizer.Load(Path.Combine(Fixtures.Root, "tokenizers", "llama2")));
    private static readonly Lazy<ModelTokenizer> Qwen3 = new(() => ModelTokenizer.Load(Path.Combine(Fixtures.Root, "tokenizers", "qwen3")));
    private static readonly Lazy<TokenVocabulary> Llama2Vocab = new(() => new TokenVocabulary(Llama2.Value, Llama2.Value.Count));
    private static readonly Lazy<TokenVocabulary> Qwen3Vocab = new(() => new TokenVocabulary(Qwen3.Value, 151_936));

    private const string PersonSchema = """
        {"type": "object", "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "role": {"enum": ["admin", "user", null]},
            "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"}, "maxItems": 3},
            "address": {"$ref": "#/$defs/address"}},
         "required": ["name", "age"], "additionalProperties": false,
         "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city"]}}}
        """;

    private static GrammarMatcher Matcher(StructuredOutputs c, TokenVocabulary v) => new(ConstraintCompiler.Compile(c), v);

    private static bool Accepts(StructuredOutputs c, string text)
    {
        var m = Matcher(c, Llama2Vocab.Value);
        return m.TryAdvance(Encoding.UTF8.GetBytes(text)) && m.IsAccepting;
    }

    public static TheoryData<string, string, string> MaskCases => new()
    {
        { "json-schema", PersonSchema, """{"name": "Ada", "age": 36, "role": "admin", "tags": ["x", "yz"], "address": {"city": "Zürich", "zip": "80331"}}""" },
        { "regex", @"\d{3}-[a-z]+( [A-Z]\w*)?", "123-abc Hello_1" },
        { "choice", "", "positive" },
        { "grammar", """
            root ::= "call " name "(" %json{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]} ")"
            name ::= [a-z]+ ("_" [a-z]+)*
            """, """call get_weather({"n":12})""" },
    };

    private static StructuredOutputs Constraint(string kind, string text) => kind switch
    {
        "json-schema" => StructuredOutputs.ForJsonSchema(text, JsonWhitespace.Flexible),
        "regex" => StructuredOutputs.ForRegex(text),
        "choice" => StructuredOutputs.ForChoice("positive", "negative", "neutral"),
        _ => StructuredOutputs.ForGrammar(text),
    };

    [Theory]
    [MemberData(nameof(MaskCases))]
    public void Mask_is_exactly_the_tokens_the_matcher_can_advance_by(string kind, string text, string valid)
    {
        // Every position of a valid text, tokenised by the SentencePiece (byte fallback) vocabulary: the trie walk with
        // its cached per-state sets must equal trying every token on its own.
        var vocab = Llama2Vocab.Value;
        var m = Matcher(Constraint(kind, text), vocab);
        var ids = LongestMatchTokens(vocab, valid);
        var mask = new ulong[vocab.Words];
        for (int pos = 0; pos <= ids.Length; pos++)
        {
            m.FillMask(mask);
            for (int t = 0; t < Llama2.Value.Count; t++)
            {
                bool inMask = (mask[t >> 6] & (1UL << t)) != 0;
                Assert.True(inMask == m.Allows(t), $"{kind}: token {t} ({Encoding.UTF8.GetString(vocab.TokenBytes(t))}) at position {pos}: mask says {inMask}");
            }
            if (pos < ids.Length) Assert.True(m.TryAdvance(ids[pos]), $"{kind}: token {pos} of the valid text refused");
        }
        Assert.True(m.IsAccepting);
    }

    /// <summary>The text as tokens, longest vocabulary match first (any segmentation will do for checking masks).</summary>
    private static int[] LongestMatchTokens(TokenVocabulary vocab, string text)
    {
        var bytes = Encoding.UTF8.GetBytes(text);
        var ids = new List<int>();
        for (int at = 0; at < bytes.Length;)
        {
            int best = -1, bestLen = 0;
            for (int t = 0; t < vocab.VocabSize; t++)
            {
                var b = vocab.TokenBytes(t);
                if (b.Length > bestLen && bytes.AsSpan(at).StartsWith(b)) { best = t; bestLen = b.Length; }
            }
            Assert.True(best >= 0, $"no token for byte {at} of '{text}'");
            ids.Add(best);
            at += bestLen;
        }
        return [.. ids];
    }

    /// <summary>
    /// Inside strings the walk takes subtrees of text whole where the automaton steps uniformly on characters (an
    /// unbounded string, and a bounded one while the subtree has no more characters than are left); these cases check
    /// it against advancing by each token, at every position: free strings, maxLength strings down to their last
    /// characters (ASCII and multi-byte), and a pattern (not uniform: walked node by node).
    /// </summary>
    [Theory]
    [InlineData("""{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}""", """{"name": "Ada Lovelace", "age": 3""")]
    [InlineData("""{"type": "object", "properties": {"code": {"type": "string", "maxLength": 6}}, "required": ["code"]}""", """{"code": "ab cd" """)]
    [InlineData("""{"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]+-[0-9]{2,}$"}}}""", """{"id": "abc-12" """)]
    [InlineData("""{"type": "object", "properties": {"city": {"type": "string", "maxLength": 7}}, "required": ["city"]}""", """{"city": "Zü東京 x" """)]
    [InlineData("""{"type": "object", "properties": {"note": {"type": "string"}}}""", """{"note": "naïve 日本語 ok" """)]
    public void Mask_over_the_byte_level_Qwen3_vocabulary_matches_advancing_each_token(string schema, string text)
    {
        var vocab = Qwen3Vocab.Value;
        var m = Matcher(StructuredOutputs.ForJsonSchema(schema, JsonWhitespace.Flexible), vocab);
        var ids = Qwen3.Value.Encode(text, addSpecialTokens: false);
        var mask = new ulong[vocab.Words];
        foreach (int next in ids.Append(-1))
        {
            m.FillMask(mask);
            int allowed = 0;
            for (int t = 0; t < Qwen3.Value.Count; t++)
            {
                bool inMask = (mask[t >> 6] & (1UL << t)) != 0;
                if (inMask) allowed++;
                Assert.True(inMask == m.Allows(t), $"token {t} ({Encoding.UTF8.GetString(vocab.TokenBytes(t))}): mask says {inMask}");
            }
            Assert.True(allowed > 0);
            if (next >= 0) Assert.True(m.TryAdvance(next));
        }
    }

    public static TheoryData<string, string> SchemaInstances => new()
    {
        { PersonSchema, """{"name": "Ada", "age": 36}""" },
        { PersonSchema, """{"name": "Ada", "age": 36, "tags": []}""" },
        { PersonSchema, """{"name": "Bob", "age": 0, "role": null, "address": {"city": "Oslo", "extra": [1, {"a": null}]}}""" },
        { PersonSchema, """{"name": "", "age": 36}""" },
        { PersonSchema, """{"name": "Ada", "age": 131}""" },
        { PersonSchema, """{"name": "Ada", "age": -1}""" },
        { PersonSchema, """{"name": "Ada", "age": 3.5}""" },
        { PersonSchema, """{"name": "Ada"}""" },
        { PersonSchema, """{"name": "Ada", "age": 1, "nickname": "A"}""" },
        { PersonSchema, """{"name": "Ada", "age": 1, "role": "root"}""" },
        { PersonSchema, """{"name": "Ada", "age": 1, "tags": ["A"]}""" },
        { PersonSchema, """{"name": "Ada", "age": 1, "tags": ["a", "b", "c", "d"]}""" },
        { PersonSchema, """{"name": "Ada", "age": 1, "address": {"zip": "12345"}}""" },
        { PersonSchema, """{"name": "Ada", "age": 1, "address": {"city": "X", "zip": "1234"}}""" },
        { PersonSchema, """{"name": "a very long name", "age": 1}""" },
        { """{"type": ["string", "null"], "format": "date"}""", "\"2024-02-29\"" },
        { """{"type": ["string", "null"], "format": "date"}""", "\"2023-02-29\"" },
        { """{"type": ["string", "null"], "format": "date"}""", "null" },
        { """{"anyOf": [{"type": "integer", "exclusiveMinimum": 5}, {"type": "string", "maxLength": 2}]}""", "5" },
        { """{"anyOf": [{"type": "integer", "exclusiveMinimum": 5}, {"type": "string", "maxLength": 2}]}""", "6" },
        { """{"anyOf": [{"type": "integer", "exclusiveMinimum": 5}, {"type": "string", "maxLength": 2}]}""", "\"ab\"" },
        { """{"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"properties": {"b": {"type": "boolean"}}, "additionalProperties": false}]}""", """{"a": 1}""" },
        { """{"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"properties": {"b": {"type": "boolean"}}, "additionalProperties": false}]}""", """{"a": 1, "b": true}""" },
        { """{"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"properties": {"b": {"type": "boolean"}}, "additionalProperties": false}]}""", """{"b": true}""" },
        { """{"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": false}""", """[1, "a"]""" },
        { """{"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": false}""", """[1, "a", 2]""" },
        { """{"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": false}""", """["a"]""" },
        { """{"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}}, "required": ["v"], "additionalProperties": false}}}""", """{"v": 1, "next": {"v": 2, "next": {"v": 3}}}""" },
        { """{"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}}, "required": ["v"], "additionalProperties": false}}}""", """{"v": 1, "next": {"next": {"v": 3}}}""" },
        { """{"const": {"a": [1, "x"]}}""", """{"a": [1, "x"]}""" },
        { """{"const": {"a": [1, "x"]}}""", """{"a": [1, "y"]}""" },
        { """{"type": "number", "minimum": -2, "exclusiveMaximum": 3}""", "-2.0" },
        { """{"type": "number", "minimum": -2, "exclusiveMaximum": 3}""", "2.999" },
        { """{"type": "number", "minimum": -2, "exclusiveMaximum": 3}""", "3" },
        { """{"type": "number", "minimum": -2, "exclusiveMaximum": 3}""", "-2.01" },
        { """{"type": "string", "format": "uuid"}""", "\"123e4567-e89b-12d3-a456-426614174000\"" },
        { """{"type": "string", "format": "uuid"}""", "\"123e4567-e89b-12d3-a456-42661417400\"" },
        { """{"type": "string", "format": "email"}""", "\"ada@example.org\"" },
        { """{"type": "string", "format": "ipv4"}""", "\"192.168.0.256\"" },
        { """{"type": "string", "format": "date-time"}""", "\"2024-05-01T12:30:00Z\"" },
        { """{"type": "string", "format": "date-time"}""", "\"2024-05-01 25:30:00Z\"" },
        { PatternSchema, """{"name": "a", "x-1": 2}""" },
        { PatternSchema, """{"x-a": 3, "name": "b"}""" },
        { PatternSchema, """{"x-1": "s"}""" },
        { PatternSchema, """{"y": 1}""" },
        { """{"properties": {"x-a": {"type": "integer"}}, "patternProperties": {"^x-": {"minimum": 5}}}""", """{"x-a": 3}""" },
        { """{"properties": {"x-a": {"type": "integer"}}, "patternProperties": {"^x-": {"minimum": 5}}}""", """{"x-a": 7}""" },
        { """{"properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a", "b"]}""", """{"b": "x", "a": 1}""" },
        { """{"properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a", "b"]}""", """{"b": "x", "c": 1}""" },
        { """{"type": "object", "minProperties": 1}""", "{}" },
        { """{"type": "object", "minProperties": 1}""", """{"a": 1}""" },
        { """{"type": "integer", "multipleOf": 7, "minimum": 0}""", "21" },
        { """{"type": "integer", "multipleOf": 7, "minimum": 0}""", "22" },
        { """{"type": "integer", "multipleOf": 7, "minimum": 0}""", "-7" },
        { """{"type": "number", "multipleOf": 5}""", "10.0" },
        { """{"type": "number", "multipleOf": 5}""", "12" },
        { """{"enum": [2.0, 0.5, "a"]}""", "2" },
        { """{"enum": [2.0, 0.5, "a"]}""", "0.50" },
        { """{"enum": [2.0, 0.5, "a"]}""", "3" },
    };

    private const string PatternSchema = """{"type": "object", "patternProperties": {"^x-": {"type": "integer"}}, "properties": {"name": {"type": "string"}}, "additionalProperties": false}""";

    [Theory]
    [MemberData(nameof(SchemaInstances))]
    public void Schema_accepts_exactly_what_an_independent_validator_accepts(string schema, string instance)
    {
        var validator = JsonSchema.FromText(schema);
        bool expected = validator.Evaluate(System.Text.Json.JsonDocument.Parse(instance).RootElement, new EvaluationOptions { RequireFormatValidation = true }).IsValid;
        Assert.Equal(expected, Accepts(StructuredOutputs.ForJsonSchema(schema, JsonWhitespace.Flexible) with { StrictJson = false }, instance));
    }

    [Fact]
    public void Compact_json_has_no_whitespace_and_flexible_takes_any()
    {
        const string schema = """{"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}""";
        Assert.True(Accepts(StructuredOutputs.ForJsonSchema(schema), """{"a":[1,2]}"""));
        Assert.False(Accepts(StructuredOutputs.ForJsonSchema(schema), """{"a": [1,2]}"""));
        Assert.True(Accepts(StructuredOutputs.ForJsonSchema(schema, JsonWhitespace.Flexible), "{\n  \"a\" :\t[ 1 ,2 ]\r\n}"));
    }

    [Theory]
    [InlineData("1.0", "1.0")]
    [InlineData("1e-05", "1e-05")]
    [InlineData("0.0001", "0.0001")]
    [InlineData("123456789012345678.0", "1.2345678901234568e+17")]
    [InlineData("1e16", "1e+16")]
    [InlineData("1.5e300", "1.5e+300")]
    [InlineData("1E5", "100000.0")]
    [InlineData("-2.5e-7", "-2.5e-07")]
    [InlineData("3.14159", "3.14159")]
    [InlineData("12345678901234567.0", "1.2345678901234568e+16")]
    [InlineData("-0", "0")]
    [InlineData("42", "42")]
    public void Numbers_print_as_python_prints_them_after_json_loads(string raw, string python)
    {
        // Expected values: Python 3's repr(float(raw)) / int(raw), as MaskBench's serialisation writes them.
        Assert.Equal(python, PythonJson.Number(raw));
    }

    [Fact]
    public void Json_object_mode_takes_any_object_and_nothing_else()
    {
        var c = StructuredOutputs.ForJsonObject();
        Assert.True(Accepts(c, """{"a":[1,{"b":null,"c":-2.5e3}],"d":"\u00e9\n"}"""));
        Assert.True(Accepts(c, "{}"));
        Assert.False(Accepts(c, "[1]"));
        Assert.False(Accepts(c, "\"x\""));
        Assert.False(Accepts(c, "{\"a\":01}"));
    }

    [Fact]
    public void Strict_json_generates_only_listed_properties_unless_the_schema_allows_more()
    {
        const string open = """{"type": "object", "properties": {"a": {"type": "integer"}}}""";
        const string explicitlyOpen = """{"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}}""";
        Assert.False(Accepts(StructuredOutputs.ForJsonSchema(open), """{"a":1,"b":2}"""));
        Assert.True(Accepts(StructuredOutputs.ForJsonSchema(open) with { StrictJson = false }, """{"a":1,"b":2}"""));
        Assert.True(Accepts(StructuredOutputs.ForJsonSchema(explicitlyOpen), """{"a":1,"b":"x"}"""));
        Assert.False(Accepts(StructuredOutputs.ForJsonSchema(explicitlyOpen), """{"a":1,"b":2}"""));
        Assert.False(Accepts(StructuredOutputs.ForJsonSchema(explicitlyOpen), """{"a":1,"a":"x"}"""));
    }

    [Fact]
    public void Properties_come_in_the_schemas_order()
    {
        const string schema = """{"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}, "additionalProperties": false}""";
        Assert.True(Accepts(StructuredOutputs.ForJsonSchema(schema), """{"b":1,"a":2}"""));
        Assert.False(Accepts(StructuredOutputs.ForJsonSchema(schema), """{"a":2,"b":1}"""));
    }

    [Fact]
    public void Integer_and_number_bounds_match_direct_comparison()
    {
        var bounds = new (string Json, Func<decimal, bool> Holds)[]
        {
            ("\"minimum\": -7, \"maximum\": 12", x => x >= -7 && x <= 12),
            ("\"exclusiveMinimum\": -7, \"exclusiveMaximum\": 12", x => x > -7 && x < 12),
            ("\"minimum\": 0", x => x >= 0),
            ("\"exclusiveMinimum\": 0", x => x > 0),
            ("\"maximum\": -3", x => x <= -3),
            ("\"minimum\": 95, \"maximum\": 105", x => x >= 95 && x <= 105),
            ("\"minimum\": 10, \"exclusiveMaximum\": 10", _ => false),
        };
        foreach (var (json, holds) in bounds)
            foreach (var type in new[] { "integer", "number" })
            {
                var schema = $"{{\"type\": \"{type}\", {json}}}";
                StructuredOutputs c = StructuredOutputs.ForJsonSchema(schema);
                bool compiled = true;
                try
                {
                    ConstraintCompiler.Compile(c);
                }
                catch (GrammarException)
                {
                    compiled = false;
                }
                if (!compiled)
                {
                    Assert.DoesNotContain(Enumerable.Range(-130, 260), i => holds(i)); // only an empty range may fail to compile
                    continue;
                }
                for (int i = -130; i <= 130; i++)
                {
                    Assert.True(holds(i) == Accepts(c, i.ToString(CultureInfo.InvariantCulture)), $"{schema} at {i}");
                    if (type == "number")
                        foreach (var frac in new[] { "0", "25", "5", "001", "999" })
                        {
                            var text = $"{i}.{frac}";
                            var value = decimal.Parse(text, CultureInfo.InvariantCulture);
                            if (i == 0 && frac != "0") continue;
                            Assert.True(holds(value) == Accepts(c, text), $"{schema} at {text}");
                        }
                    else Assert.False(Accepts(c, $"{i}.5"), $"{schema}: {i}.5 is no integer");
                }
            }
    }

    [Fact]
    public void Dates_match_the_calendar()
    {
        var c = StructuredOutputs.ForJsonSchema("""{"type": "string", "format": "date"}""");
        foreach (int year in new[] { 1900, 2000, 2023, 2024 })
            for (int month = 0; month <= 13; month++)
                for (int day = 0; day <= 32; day++)
                {
                    var text = $"{year:D4}-{month:D2}-{day:D2}";
                    bool real = DateTime.TryParseExact(text, "yyyy-MM-dd", CultureInfo.InvariantCulture, DateTimeStyles.None, out _);
                    Assert.True(real == Accepts(c, $"\"{text}\""), text);
                }
    }

    [Fact]
    public void Regex_choice_and_grammar_constraints_match_whole_outputs()
    {
        var regex = StructuredOutputs.ForRegex(@"(yes|no)(, because [a-z ]{1,20})?\.");
        Assert.True(Accepts(regex, "yes."));
        Assert.True(Accepts(regex, "no, because it rains."));
        Assert.False(Accepts(regex, "maybe."));
        Assert.False(Accepts(regex, "yes"));
        var choice = StructuredOutputs.ForChoice("red", "green", "Grün");
        Assert.True(Accepts(choice, "Grün"));
        Assert.False(Accepts(choice, "gree"));
        var grammar = StructuredOutputs.ForGrammar("""
            root ::= expr
            expr ::= term (("+" | "-") term)*
            term ::= [0-9]+ | "(" expr ")"   # recursion through parentheses
            """);
        Assert.True(Accepts(grammar, "1+(2-(30+4))"));
        Assert.False(Accepts(grammar, "1+(2"));
        Assert.False(Accepts(grammar, "1+"));
    }

    [Fact]
    public void Grammar_extensions_and_deep_right_recursion()
    {
        var until = StructuredOutputs.ForGrammar("root ::= %text_without(\"END\") \"END\"");
        Assert.True(Accepts(until, "abc ENd EN END"));
        Assert.False(Accepts(until, "abENDcEND"));
        // Right recursion is a tail call: 5,000 levels need no stack (a thread's stack is capped at 2,000 frames).
        var list = StructuredOutputs.ForGrammar("root ::= [0-9] (\",\" root)?");
        Assert.True(Accepts(list, string.Join(",", Enumerable.Repeat("7", 5000))));
        Assert.False(Accepts(list, "1,,2"));
    }

    public static TheoryData<string, string> BadConstraints => new()
    {
        { "json", "{\"type\": " },
        { "json", """{"type": "object", "not": {"required": ["a"]}}""" },
        { "json", """{"type": "string", "minLength": 5, "maxLength": 2}""" },
        { "json", """{"type": "widget"}""" },
        { "json", """{"$ref": "https://example.com/schema.json"}""" },
        { "json", """{"type": "string", "pattern": "(?=a)b"}""" },
        { "regex", "(ab" },
        { "regex", @"(a)\1" },
        { "grammar", "start ::= \"a\"" },
        { "grammar", "root ::= \"a\" other" },
        { "grammar", "root ::= \"a" },
    };

    [Theory]
    [MemberData(nameof(BadConstraints))]
    public void A_bad_constraint_is_an_argument_exception_that_names_the_problem(string kind, string text)
    {
        var c = kind switch
        {
            "json" => StructuredOutputs.ForJsonSchema(text),
            "regex" => StructuredOutputs.ForRegex(text),
            _ => StructuredOutputs.ForGrammar(text),
        };
        var e = Assert.ThrowsAny<ArgumentException>(() => ConstraintCompiler.Compile(c));
        var expectedWord = text switch
        {
            _ when text.Contains("\"not\"") => "'not'",
            _ when text.Contains("minLength") => "unsatisfiable",
            _ when text.Contains("widget") => "unknown type 'widget'",
            _ when text.Contains("https") => "remote reference",
            _ when text.Contains("(?=") => "lookahead",
            _ when text == "(ab" => "missing ')'",
            _ when text.Contains(@"\1") => "backreferences",
            _ when text.StartsWith("start") => "no 'root' rule",
            _ when text.Contains("other") => "'other'",
            _ when text == "root ::= \"a" => "unterminated string",
            _ => "not valid JSON",
        };
        Assert.Contains(expectedWord, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Maskbench_cases_never_let_an_invalid_instance_through()
    {
        // The protocol of shared/fixtures/maskbench/README.md at byte level (a token is refused exactly when one of its
        // bytes is): every invalid instance of every schema the compiler accepts must be refused somewhere; valid
        // instances refused are counted against the issue's bound (0.5% of files).
        var dir = Path.Combine(Fixtures.Root, "maskbench", "cases");
        int files = 0, compiled = 0, invalidationErrors = 0, validationErrors = 0;
        var letThrough = new List<string>();
        foreach (var file in Directory.GetFiles(dir, "*.json").Order(StringComparer.Ordinal))
        {
            files++;
            var doc = JsonNode.Parse(File.ReadAllText(file))!;
            CompiledGrammar grammar;
            try
            {
                grammar = ConstraintCompiler.Compile(StructuredOutputs.ForJsonSchema(doc["schema"]!.ToJsonString(), JsonWhitespace.Flexible) with { StrictJson = false });
            }
            catch (GrammarException)
            {
                continue;
            }
            compiled++;
            foreach (var test in (doc["tests"] as JsonArray) ?? [])
            {
                var m = new GrammarMatcher(grammar, Llama2Vocab.Value);
                bool allowed = m.TryAdvance(Encoding.UTF8.GetBytes(PythonJson.Dumps(test!["data"])));
                bool valid = test["valid"]!.GetValue<bool>();
                if (!valid && allowed) { invalidationErrors++; letThrough.Add(Path.GetFileName(file)); }
                if (valid && !allowed) validationErrors++;
            }
        }
        Assert.Equal(1427, files);
        Assert.True(compiled > files * 8 / 10, $"only {compiled} of {files} schemas compiled");
        Assert.True(invalidationErrors == 0, $"invalid instances let through: {string.Join(", ", letThrough)}");
        Assert.True(validationErrors <= files / 200, $"{validationErrors} valid instances refused");
    }
}
