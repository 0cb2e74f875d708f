"""A seeded synthetic world from which tool-use questions are composed.

The world is a schema (entity types, relations between them, attribute kinds) plus a
fact function: the object of a relation for a subject is a pure function of
(world seed, relation, subject name). Nothing is stored, so the world is unbounded,
costs nothing to build, and is consistent: the same subject always has the same facts.

Every name is invented from syllables, so no fact can be known without calling a tool
(FTRL's rule that the answer must come from the tools).

A WorldSpec shrinks the world for small models: names from a fixed pool per entity type,
a chain-friendly subset of relations, one canonical tool name per relation. The default
spec is the full world, drawing exactly as it always has.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import types
from typing import Any, Callable, Iterable, Mapping

# The world of the `tiny-instruct` preset and of its shipped policy (configs/qwen.py, configs/tiny.py):
# 256 recurring names per entity type (too many to memorize, so a small model learns to copy them), 12 relations,
# one tool name per relation.
TINY_WORLD = "pool=256,relations=12,fixed_names=1"


# --- name material -----------------------------------------------------------------

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr",
           "r", "s", "st", "t", "tr", "th", "v", "z", "sh", "ch", "j", "w", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "ia", "y", "io")
_CODAS = ("", "", "", "", "", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x", "v")
_ADJECTIVES = ("Silent", "Crimson", "Hollow", "Golden", "Restless", "Distant", "Shattered", "Amber",
               "Quiet", "Burning", "Frozen", "Hidden", "Wandering", "Velvet", "Iron", "Silver",
               "Broken", "Endless", "Pale", "Northern", "Bitter", "Gentle", "Midnight", "Scarlet")
_NOUNS = ("Harbor", "Orchard", "Lantern", "River", "Garden", "Tower", "Meadow", "Compass", "Mirror",
          "Winter", "Echo", "Cathedral", "Voyage", "Horizon", "Archive", "Citadel", "Shoreline",
          "Feather", "Ember", "Labyrinth", "Signal", "Promise", "Tide", "Anthem")
_ANIMALS = ("Falcons", "Wolves", "Otters", "Comets", "Stags", "Herons", "Lynxes", "Ravens", "Bison",
            "Mariners", "Foxes", "Titans", "Hornets", "Pilots", "Rangers")


# Every onset-vowel-coda combination, so a syllable costs one draw (names are made by the million).
_SYLLABLES = tuple(o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS)


def invented_root(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable invented word such as 'Kelvora' (capitalized)."""
    count = syllables[0] + int(rng.random() * (syllables[1] - syllables[0] + 1))
    return "".join([_SYLLABLES[int(rng.random() * len(_SYLLABLES))] for _ in range(count)]).capitalize()


def _pick(*templates: str) -> Callable[[random.Random], str]:
    """A name maker filling one of the templates; {r} is an invented root, {a}/{n} words."""

    def make(rng: random.Random) -> str:
        template = rng.choice(templates)
        return template.format(
            r=invented_root(rng), r2=invented_root(rng, (1, 2)), a=rng.choice(_ADJECTIVES),
            n=rng.choice(_NOUNS), animal=rng.choice(_ANIMALS), k=rng.randint(2, 99))

    return make


# --- entity types --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EntityType:
    """A kind of thing in the world; `param` names the tool argument that identifies one."""

    key: str
    noun: str
    param: str
    param_description: str
    make_name: Callable[[random.Random], str]


_ENTITY_TYPES = (
    EntityType("person", "person", "person_name", "full name of the person",
               _pick("{r} {r2}son", "{r} {r}", "{r2} {r}", "{r} {r2}ova", "{r} {r2}berg")),
    EntityType("city", "city", "city_name", "name of the city",
               _pick("{r}", "{r}holm", "{r}ville", "Port {r}", "New {r}", "{r}burg", "{r}ford")),
    EntityType("country", "country", "country_name", "name of the country",
               _pick("{r}ia", "{r}land", "{r}stan", "Republic of {r}", "{r}ora")),
    EntityType("company", "company", "company_name", "registered name of the company",
               _pick("{r} Industries", "{r} Systems", "{r} Labs", "{r} Holdings", "{r} Dynamics",
                     "{r} Works", "{r} Motors")),
    EntityType("product", "product", "product_name", "name of the product",
               _pick("{r} {k}", "{r} Pro", "{r} Nova", "{r}-{k}X")),
    EntityType("book", "book", "book_title", "title of the book",
               _pick("The {a} {n}", "{n} of {r}", "The {r} {n}", "A {a} {n}")),
    EntityType("film", "film", "film_title", "title of the film",
               _pick("{a} {n}", "The {n} of {r}", "{r} Rising", "Return to {r}")),
    EntityType("album", "album", "album_title", "title of the album",
               _pick("{a} {n}s", "{r} Sessions", "Songs from {r}", "{n} in {a}")),
    EntityType("band", "band", "band_name", "name of the band",
               _pick("The {a} {n}s", "{r} Collective", "{r} and the {n}s", "{a} {r}")),
    EntityType("university", "university", "university_name", "name of the university",
               _pick("University of {r}", "{r} Institute of Technology", "{r} College",
                     "{r} State University")),
    EntityType("team", "sports team", "team_name", "name of the sports team",
               _pick("{r} {animal}", "{r} United", "Real {r}", "{r} {animal} FC")),
    EntityType("stadium", "stadium", "stadium_name", "name of the stadium",
               _pick("{r} Arena", "{r} Park", "{r} Field", "{r} Stadium")),
    EntityType("museum", "museum", "museum_name", "name of the museum",
               _pick("{r} Museum of Art", "{r} History Museum", "National Gallery of {r}",
                     "{r} Science Museum")),
    EntityType("painting", "painting", "painting_title", "title of the painting",
               _pick("{a} {n}", "Portrait of {r} {r2}", "The {n} at {r}", "Study in {a}")),
    EntityType("river", "river", "river_name", "name of the river", _pick("{r} River", "River {r}")),
    EntityType("mountain", "mountain", "mountain_name", "name of the mountain",
               _pick("Mount {r}", "{r} Peak", "{r}horn")),
    EntityType("lake", "lake", "lake_name", "name of the lake", _pick("Lake {r}", "{r} Lake")),
    EntityType("species", "plant species", "species_name", "common name of the plant species",
               _pick("{r} orchid", "{r} lily", "{r}an fern", "{r} moonflower", "{r} thistle")),
    EntityType("ship", "ship", "ship_name", "name of the ship", _pick("SS {r}", "{r} Star", "MV {r}")),
    EntityType("festival", "festival", "festival_name", "name of the festival",
               _pick("{r} Lantern Festival", "{r} Music Festival", "{r} Harvest Fair",
                     "{r} Film Festival")),
    EntityType("dish", "dish", "dish_name", "name of the dish",
               _pick("{r} stew", "{r} dumplings", "{r} flatbread", "{r}-style curry")),
    EntityType("language", "language", "language_name", "name of the language",
               _pick("{r}ish", "{r}ese", "{r}ic", "{r}i")),
)
ENTITY_TYPES: dict[str, EntityType] = {t.key: t for t in _ENTITY_TYPES}


# --- value kinds (attribute objects that end a chain) ----------------------------------

def _number(low: int, high: int, suffix: str = "") -> Callable[[random.Random], str]:
    return lambda rng: f"{rng.randint(low, high):,}{suffix}"


def _money(low: int, high: int) -> Callable[[random.Random], str]:
    return lambda rng: f"${rng.randint(low, high):,} million"


def _word(*words: str) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(words)


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1890, 2023)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _ticker(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHJKLMNPRSTVWXZ") for _ in range(rng.randint(3, 4)))


VALUE_KINDS: dict[str, Callable[[random.Random], str]] = {
    "year": lambda rng: str(rng.randint(1450, 2023)),
    "modern_year": lambda rng: str(rng.randint(1950, 2023)),
    "date": _date,
    "population": _number(12_000, 9_800_000),
    "count": _number(1_200, 95_000),
    "small_count": _number(3, 60),
    "pages": _number(90, 1_400, " pages"),
    "meters": _number(150, 8_700, " meters"),
    "depth": _number(12, 1_600, " meters"),
    "km": _number(40, 6_500, " km"),
    "area": _number(15, 82_000, " square kilometers"),
    "minutes": _number(78, 212, " minutes"),
    "tonnes": _number(900, 220_000, " tonnes"),
    "money": _money(2, 9_800),
    "calling_code": lambda rng: f"+{rng.randint(20, 998)}",
    "ticker": _ticker,
    "currency": lambda rng: f"{invented_root(rng, (1, 2))} " + rng.choice(
        ("crown", "mark", "dinar", "florin", "peso", "lira", "shilling", "taler")),
    "occupation": _word("cartographer", "violinist", "architect", "marine biologist", "glassblower",
                        "astronomer", "stonemason", "translator", "beekeeper", "locksmith",
                        "botanist", "typesetter", "clockmaker", "surveyor"),
    "book_genre": _word("historical fiction", "science fiction", "mystery", "travel memoir",
                        "epic poetry", "gothic horror", "satire", "coming-of-age novel"),
    "music_genre": _word("post-rock", "folk metal", "synth-pop", "bluegrass", "dream pop",
                         "afrobeat", "chamber jazz", "shoegaze", "sea shanties"),
    "color": _word("crimson", "cobalt blue", "saffron", "emerald green", "violet", "charcoal grey",
                   "ivory", "turquoise", "amber", "magenta"),
    "medium": _word("oil on canvas", "tempera on panel", "watercolor", "fresco", "gouache",
                    "charcoal on paper", "acrylic on linen"),
    "status": _word("endangered", "vulnerable", "critically endangered", "near threatened",
                    "least concern"),
    "month": _word("January", "February", "March", "April", "September", "October", "November",
                   "December", "June", "July"),
    "ingredient": _word("smoked trout", "chickpeas", "wild mushrooms", "lamb shoulder", "buckwheat",
                        "river crayfish", "sweet chestnuts", "goat cheese", "pickled plums"),
    "script": lambda rng: f"{invented_root(rng, (1, 2))} script",
    "language_family": lambda rng: f"{invented_root(rng, (1, 2))}ic languages",
    "animal": _word("snow owl", "red deer", "river otter", "mountain goat", "golden eagle", "badger",
                    "lynx", "heron", "bison"),
}


# --- relations -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Relation:
    """A functional fact `subject -> target`; target is an entity type or a value kind.

    phrases: noun phrases naming the object, with {x} for the subject's mention.
    stems: words tool names are built from. summary: what a tool for it finds.
    field: the label tools use for it (output key, selector value); unique per subject type,
    while `key` is unique in the world.
    """

    key: str
    subject: str
    target: str
    phrases: tuple[str, ...]
    stems: tuple[str, ...]
    summary: str
    field: str

    @property
    def chains(self) -> bool:
        """True when the object is an entity, so another hop can start from it."""
        return self.target in ENTITY_TYPES


def _rel(key: str, subject: str, target: str, phrases: Iterable[str], stems: Iterable[str],
         summary: str, field: str | None = None) -> Relation:
    return Relation(key, subject, target, tuple(phrases), tuple(stems), summary, field or key)


_RELATIONS = (
    # person
    _rel("birth_city", "person", "city", ["the city where {x} was born", "the birthplace of {x}"],
         ["birthplace", "birth_city", "hometown"], "the city where a person was born"),
    _rel("alma_mater", "person", "university",
         ["the university {x} graduated from", "the alma mater of {x}"],
         ["alma_mater", "education", "graduate_school"], "the university a person graduated from"),
    _rel("employer", "person", "company", ["the company {x} works for", "the employer of {x}"],
         ["employer", "workplace", "employment"], "the company a person works for"),
    _rel("native_language", "person", "language",
         ["the native language of {x}", "the first language spoken by {x}"],
         ["native_language", "mother_tongue"], "the native language of a person"),
    _rel("birth_year", "person", "year", ["the year {x} was born", "the birth year of {x}"],
         ["birth_year", "birth_record"], "the year a person was born"),
    _rel("occupation", "person", "occupation", ["the occupation of {x}", "the profession of {x}"],
         ["occupation", "profession", "career"], "the occupation of a person"),
    _rel("birth_date", "person", "date", ["the date of birth of {x}", "the exact birth date of {x}"],
         ["birth_date", "birthday"], "the date a person was born"),
    # city
    _rel("city_country", "city", "country",
         ["the country where {x} is located", "the country {x} belongs to"],
         ["city_country", "country_of_city", "city_nation"], "the country a city is in", field="country"),
    _rel("city_river", "city", "river", ["the river that flows through {x}", "the main river of {x}"],
         ["city_river", "urban_waterway", "river_crossing"], "the river flowing through a city", field="river"),
    _rel("home_team", "city", "team", ["the sports team based in {x}", "the home team of {x}"],
         ["home_team", "local_team", "city_sports"], "the sports team based in a city"),
    _rel("main_museum", "city", "museum", ["the largest museum in {x}", "the main museum of {x}"],
         ["main_museum", "city_museum"], "the largest museum of a city"),
    _rel("city_population", "city", "population",
         ["the population of {x}", "the number of people living in {x}"],
         ["city_population", "census", "urban_population"], "the population of a city", field="population"),
    _rel("city_founded", "city", "year", ["the year {x} was founded", "the founding year of {x}"],
         ["city_founding", "city_history"], "the year a city was founded", field="founding_year"),
    _rel("city_elevation", "city", "meters",
         ["the elevation of {x}", "the altitude of {x} above sea level"],
         ["city_elevation", "altitude"], "the elevation of a city", field="elevation"),
    _rel("mayor", "city", "person", ["the mayor of {x}", "the person who governs {x} as mayor"],
         ["mayor", "city_leader", "municipal_office"], "the mayor of a city"),
    # country
    _rel("capital", "country", "city", ["the capital of {x}", "the capital city of {x}"],
         ["capital", "capital_city", "national_capital"], "the capital city of a country"),
    _rel("official_language", "country", "language",
         ["the official language of {x}", "the language officially used in {x}"],
         ["official_language", "national_language"], "the official language of a country"),
    _rel("currency", "country", "currency", ["the currency of {x}", "the currency used in {x}"],
         ["currency", "national_currency", "monetary_unit"], "the currency of a country"),
    _rel("calling_code", "country", "calling_code",
         ["the international calling code of {x}", "the telephone country code of {x}"],
         ["calling_code", "dialing_code", "phone_prefix"], "the telephone calling code of a country"),
    _rel("highest_mountain", "country", "mountain",
         ["the highest mountain in {x}", "the tallest peak of {x}"],
         ["highest_peak", "summit", "highest_mountain"], "the highest mountain of a country"),
    _rel("largest_lake", "country", "lake", ["the largest lake in {x}", "the biggest lake of {x}"],
         ["largest_lake", "lake_registry"], "the largest lake of a country"),
    _rel("national_dish", "country", "dish", ["the national dish of {x}", "the signature dish of {x}"],
         ["national_dish", "cuisine"], "the national dish of a country"),
    _rel("country_population", "country", "population",
         ["the population of {x}", "the number of inhabitants of {x}"],
         ["country_population", "national_census"], "the population of a country", field="population"),
    # company
    _rel("company_founder", "company", "person", ["the founder of {x}", "the person who founded {x}"],
         ["company_founder", "founder", "business_origin"], "the founder of a company", field="founder"),
    _rel("headquarters", "company", "city",
         ["the city where {x} is headquartered", "the headquarters city of {x}"],
         ["headquarters", "corporate_hq", "head_office"], "the headquarters city of a company"),
    _rel("flagship_product", "company", "product",
         ["the flagship product of {x}", "the best-known product made by {x}"],
         ["flagship_product", "product_line", "product_catalog"], "the flagship product of a company"),
    _rel("company_founded", "company", "year", ["the year {x} was founded", "the founding year of {x}"],
         ["company_founding", "incorporation"], "the year a company was founded", field="founding_year"),
    _rel("employees", "company", "count",
         ["the number of employees at {x}", "the workforce size of {x}"],
         ["employee_count", "workforce", "staffing"], "the number of employees of a company", field="employee_count"),
    _rel("revenue", "company", "money", ["the annual revenue of {x}", "the yearly revenue of {x}"],
         ["revenue", "financials", "earnings"], "the annual revenue of a company", field="annual_revenue"),
    _rel("ticker", "company", "ticker", ["the stock ticker of {x}", "the ticker symbol of {x}"],
         ["stock_ticker", "ticker_symbol", "market_listing"], "the stock ticker of a company", field="ticker_symbol"),
    # product
    _rel("designer", "product", "person", ["the designer of {x}", "the person who designed {x}"],
         ["product_designer", "design_credit"], "the designer of a product"),
    _rel("product_release", "product", "modern_year",
         ["the release year of {x}", "the year {x} came out"],
         ["product_release", "launch_date"], "the year a product was released", field="release_year"),
    _rel("launch_price", "product", "money", ["the launch price of {x}", "the price of {x} at launch"],
         ["launch_price", "pricing"], "the launch price of a product"),
    # book
    _rel("author", "book", "person", ["the author of {x}", "the person who wrote {x}"],
         ["author", "book_author", "writer"], "the author of a book"),
    _rel("publisher", "book", "company", ["the publisher of {x}", "the company that published {x}"],
         ["publisher", "publishing_house"], "the publisher of a book"),
    _rel("book_setting", "book", "city", ["the city in which {x} is set", "the setting of {x}"],
         ["book_setting", "story_setting", "literary_location"], "the city a book is set in", field="setting"),
    _rel("publication_year", "book", "year",
         ["the year {x} was published", "the publication year of {x}"],
         ["publication_year", "publication_record"], "the year a book was published"),
    _rel("page_count", "book", "pages", ["the number of pages in {x}", "the length of {x} in pages"],
         ["page_count", "book_length"], "the page count of a book"),
    _rel("book_genre", "book", "book_genre", ["the genre of {x}", "the literary genre of {x}"],
         ["book_genre", "literary_genre"], "the genre of a book", field="genre"),
    # film
    _rel("director", "film", "person", ["the director of {x}", "the person who directed {x}"],
         ["director", "film_director", "filmmaker"], "the director of a film"),
    _rel("based_on", "film", "book", ["the novel {x} is based on", "the book that {x} adapts"],
         ["source_novel", "adaptation", "film_source"], "the book a film is based on", field="source_novel"),
    _rel("filming_city", "film", "city", ["the city where {x} was filmed", "the filming location of {x}"],
         ["filming_location", "shooting_location"], "the city where a film was shot", field="filming_location"),
    _rel("film_release", "film", "year", ["the year {x} was released", "the release year of {x}"],
         ["film_release", "premiere"], "the year a film was released", field="release_year"),
    _rel("runtime", "film", "minutes", ["the running time of {x}", "the runtime of {x}"],
         ["runtime", "film_duration"], "the running time of a film"),
    _rel("box_office", "film", "money", ["the box-office gross of {x}", "the ticket sales of {x}"],
         ["box_office", "gross_earnings"], "the box-office gross of a film"),
    # album
    _rel("performer", "album", "band", ["the band that recorded {x}", "the band behind {x}"],
         ["album_artist", "recording_artist", "discography"], "the band that recorded an album", field="band"),
    _rel("producer", "album", "person", ["the producer of {x}", "the person who produced {x}"],
         ["record_producer", "album_producer"], "the producer of an album"),
    _rel("album_release", "album", "date", ["the release date of {x}", "the date {x} came out"],
         ["album_release", "release_date"], "the release date of an album", field="release_date"),
    _rel("track_count", "album", "small_count",
         ["the number of tracks on {x}", "the number of songs on {x}"],
         ["track_count", "tracklist"], "the number of tracks on an album"),
    # band
    _rel("lead_singer", "band", "person", ["the lead singer of {x}", "the vocalist of {x}"],
         ["lead_singer", "vocalist", "band_members"], "the lead singer of a band"),
    _rel("band_origin", "band", "city", ["the city {x} comes from", "the hometown of {x}"],
         ["band_origin", "band_hometown"], "the city a band comes from", field="origin_city"),
    _rel("debut_album", "band", "album",
         ["the debut album of {x}", "the first album released by {x}"],
         ["debut_album", "first_release"], "the debut album of a band"),
    _rel("band_formed", "band", "modern_year", ["the year {x} was formed", "the formation year of {x}"],
         ["band_formation", "band_history"], "the year a band was formed", field="formation_year"),
    _rel("music_genre", "band", "music_genre", ["the musical genre of {x}", "the style of music {x} plays"],
         ["music_genre", "music_style"], "the musical genre of a band", field="genre"),
    # university
    _rel("campus_city", "university", "city",
         ["the city where {x} is located", "the campus city of {x}"],
         ["campus_location", "university_city"], "the city a university is in", field="city"),
    _rel("university_founder", "university", "person",
         ["the founder of {x}", "the person who established {x}"],
         ["university_founder", "academic_founder"], "the founder of a university", field="founder"),
    _rel("university_founded", "university", "year",
         ["the year {x} was established", "the founding year of {x}"],
         ["university_founding", "academic_history"], "the year a university was founded", field="founding_year"),
    _rel("students", "university", "count",
         ["the number of students enrolled at {x}", "the student enrollment of {x}"],
         ["enrollment", "student_count"], "the number of students of a university", field="student_count"),
    _rel("mascot", "university", "animal", ["the mascot of {x}", "the animal mascot of {x}"],
         ["mascot", "university_mascot"], "the mascot of a university"),
    # team
    _rel("home_stadium", "team", "stadium", ["the home stadium of {x}", "the stadium where {x} plays"],
         ["home_stadium", "team_venue"], "the home stadium of a team", field="stadium"),
    _rel("head_coach", "team", "person", ["the head coach of {x}", "the person who coaches {x}"],
         ["head_coach", "coaching_staff"], "the head coach of a team"),
    _rel("championships", "team", "small_count",
         ["the number of championships won by {x}", "the number of titles {x} has won"],
         ["championship", "title_count", "trophy"], "the number of championships of a team"),
    _rel("team_colors", "team", "color", ["the main color of {x}", "the team color of {x}"],
         ["team_colors", "team_identity"], "the main color of a team", field="main_color"),
    # stadium
    _rel("stadium_city", "stadium", "city", ["the city where {x} stands", "the city that is home to {x}"],
         ["stadium_location", "venue_city"], "the city a stadium is in", field="city"),
    _rel("capacity", "stadium", "count", ["the seating capacity of {x}", "the number of seats in {x}"],
         ["stadium_capacity", "seating"], "the seating capacity of a stadium", field="seating_capacity"),
    _rel("stadium_opened", "stadium", "year", ["the year {x} opened", "the opening year of {x}"],
         ["stadium_opening", "venue_history"], "the year a stadium opened", field="opening_year"),
    # museum
    _rel("famous_painting", "museum", "painting",
         ["the most famous painting in {x}", "the best-known painting displayed at {x}"],
         ["famous_painting", "museum_collection", "artwork_highlight"],
         "the most famous painting of a museum"),
    _rel("museum_city", "museum", "city", ["the city that hosts {x}", "the city where {x} is found"],
         ["museum_location", "museum_city"], "the city a museum is in", field="city"),
    _rel("museum_opened", "museum", "year", ["the year {x} opened to the public", "the opening year of {x}"],
         ["museum_opening", "museum_history"], "the year a museum opened", field="opening_year"),
    _rel("visitors", "museum", "count",
         ["the annual number of visitors to {x}", "the yearly attendance of {x}"],
         ["visitor_statistics", "attendance"], "the yearly visitors of a museum", field="annual_visitors"),
    # painting
    _rel("painter", "painting", "person", ["the painter of {x}", "the artist who painted {x}"],
         ["painter", "artwork_artist", "attribution"], "the painter of a painting"),
    _rel("painting_year", "painting", "year", ["the year {x} was completed", "the year {x} was painted"],
         ["artwork_date", "painting_year"], "the year a painting was completed", field="completion_year"),
    _rel("painting_medium", "painting", "medium", ["the medium of {x}", "the technique used for {x}"],
         ["artwork_medium", "painting_technique"], "the medium of a painting", field="medium"),
    _rel("painting_value", "painting", "money", ["the estimated value of {x}", "the appraised value of {x}"],
         ["artwork_valuation", "appraisal"], "the estimated value of a painting", field="estimated_value"),
    # river
    _rel("river_source", "river", "mountain",
         ["the mountain where {x} has its source", "the mountain {x} springs from"],
         ["river_source", "headwaters"], "the mountain where a river rises", field="source_mountain"),
    _rel("river_mouth", "river", "lake", ["the lake into which {x} flows", "the lake fed by {x}"],
         ["river_mouth", "drainage_basin"], "the lake a river flows into", field="mouth_lake"),
    _rel("river_length", "river", "km", ["the length of {x}", "the total length of {x}"],
         ["river_length", "river_measurement"], "the length of a river", field="length"),
    # mountain
    _rel("mountain_country", "mountain", "country",
         ["the country where {x} stands", "the country that contains {x}"],
         ["mountain_country", "peak_location"], "the country a mountain is in", field="country"),
    _rel("mountain_height", "mountain", "meters", ["the height of {x}", "the summit elevation of {x}"],
         ["mountain_height", "peak_elevation"], "the height of a mountain", field="height"),
    _rel("first_climber", "mountain", "person",
         ["the first person to climb {x}", "the mountaineer who first reached the top of {x}"],
         ["first_ascent", "mountaineering_record"], "the first person to climb a mountain"),
    _rel("first_ascent_year", "mountain", "year",
         ["the year {x} was first climbed", "the year of the first ascent of {x}"],
         ["ascent_year", "climbing_history"], "the year a mountain was first climbed"),
    # lake
    _rel("lake_country", "lake", "country", ["the country where {x} lies", "the country that holds {x}"],
         ["lake_country", "lake_location"], "the country a lake is in", field="country"),
    _rel("endemic_species", "lake", "species",
         ["the rare plant that grows only around {x}", "the plant species endemic to {x}"],
         ["endemic_species", "lake_flora", "shoreline_botany"], "the plant species endemic to a lake"),
    _rel("lake_area", "lake", "area", ["the surface area of {x}", "the area covered by {x}"],
         ["lake_area", "surface_area"], "the surface area of a lake", field="surface_area"),
    _rel("lake_depth", "lake", "depth", ["the maximum depth of {x}", "the greatest depth of {x}"],
         ["lake_depth", "bathymetry"], "the maximum depth of a lake", field="max_depth"),
    # species
    _rel("discoverer", "species", "person",
         ["the botanist who discovered {x}", "the person who first described {x}"],
         ["botanical_discovery", "species_discoverer"], "the botanist who discovered a plant"),
    _rel("discovery_year", "species", "year", ["the year {x} was discovered", "the discovery year of {x}"],
         ["discovery_year", "taxonomy_record"], "the year a plant was discovered"),
    _rel("bloom_color", "species", "color", ["the flower color of {x}", "the color of the blossoms of {x}"],
         ["bloom_color", "flower_traits"], "the flower color of a plant"),
    _rel("conservation", "species", "status",
         ["the conservation status of {x}", "the threat level of {x}"],
         ["conservation_status", "red_list"], "the conservation status of a plant", field="conservation_status"),
    # ship
    _rel("captain", "ship", "person", ["the captain of {x}", "the person in command of {x}"],
         ["ship_captain", "crew_roster"], "the captain of a ship"),
    _rel("home_port", "ship", "city", ["the home port of {x}", "the port city where {x} is registered"],
         ["home_port", "ship_registry", "port_of_registry"], "the home port of a ship"),
    _rel("launch_year", "ship", "year", ["the year {x} was launched", "the launch year of {x}"],
         ["ship_launch", "shipyard_record"], "the year a ship was launched"),
    _rel("tonnage", "ship", "tonnes", ["the gross tonnage of {x}", "the weight of {x}"],
         ["tonnage", "vessel_specs"], "the gross tonnage of a ship", field="gross_tonnage"),
    # festival
    _rel("host_city", "festival", "city", ["the city that hosts {x}", "the city where {x} is held"],
         ["festival_host", "event_location"], "the city hosting a festival"),
    _rel("festival_founder", "festival", "person", ["the founder of {x}", "the person who started {x}"],
         ["festival_founder", "event_organizer"], "the founder of a festival", field="founder"),
    _rel("festival_first", "festival", "year", ["the year {x} was first held", "the first year of {x}"],
         ["festival_history", "inaugural_event"], "the year a festival was first held", field="first_year"),
    _rel("festival_month", "festival", "month", ["the month in which {x} takes place", "the month of {x}"],
         ["festival_calendar", "event_schedule"], "the month a festival takes place", field="month"),
    # dish
    _rel("dish_origin", "dish", "city", ["the city where {x} originated", "the hometown of {x}"],
         ["dish_origin", "culinary_origin"], "the city a dish comes from", field="origin_city"),
    _rel("main_ingredient", "dish", "ingredient",
         ["the main ingredient of {x}", "the key ingredient in {x}"],
         ["main_ingredient", "recipe", "ingredient_analyzer"], "the main ingredient of a dish"),
    _rel("dish_inventor", "dish", "person", ["the chef who invented {x}", "the cook who created {x}"],
         ["dish_inventor", "culinary_history"], "the chef who invented a dish", field="inventor"),
    # language
    _rel("script", "language", "script", ["the writing system of {x}", "the script used to write {x}"],
         ["writing_system", "script"], "the writing system of a language", field="writing_system"),
    _rel("speakers", "language", "population",
         ["the number of native speakers of {x}", "the number of people who speak {x} natively"],
         ["speaker_count", "language_demographics"], "the number of native speakers of a language", field="native_speakers"),
    _rel("language_family", "language", "language_family",
         ["the language family of {x}", "the family {x} belongs to"],
         ["language_family", "linguistic_classification"], "the language family of a language"),
)
RELATIONS: dict[str, Relation] = {r.key: r for r in _RELATIONS}
RELATIONS_BY_SUBJECT: dict[str, tuple[Relation, ...]] = {
    t: tuple(r for r in _RELATIONS if r.subject == t) for t in ENTITY_TYPES}
# (subject type, field label) -> relation: how a tool's selector value maps back to a fact.
RELATION_BY_FIELD: dict[tuple[str, str], Relation] = {(r.subject, r.field): r for r in _RELATIONS}

# Word lists for tool names: a stem plus one suffix, sometimes with the subject noun in front.
TOOL_SUFFIXES = ("finder", "lookup", "retriever", "locator", "identifier", "tracker", "resolver",
                 "explorer", "checker", "database", "service", "search")
PROFILE_WORDS = ("info", "profile", "facts", "details", "records", "knowledge", "registry")


def _check_schema() -> None:
    """Fails at import if a table refers to a type or value kind that does not exist."""
    for rel in _RELATIONS:
        if rel.subject not in ENTITY_TYPES:
            raise ValueError(f"relation {rel.key!r}: unknown subject type {rel.subject!r}")
        if rel.target not in ENTITY_TYPES and rel.target not in VALUE_KINDS:
            raise ValueError(f"relation {rel.key!r}: target {rel.target!r} is neither an entity type "
                             "nor a value kind in world.VALUE_KINDS")
        if not all("{x}" in p for p in rel.phrases):
            raise ValueError(f"relation {rel.key!r}: every phrase needs a {{x}} placeholder")
    if len(RELATION_BY_FIELD) != len(_RELATIONS):
        raise ValueError("two relations of one subject type share a field label; make them unique")


_check_schema()


# --- world spec: how big a world questions are drawn from --------------------------------

def _parse_bool(raw: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if raw.strip().lower() not in words:
        raise ValueError(f"expected 1/0 (or true/false), got {raw!r}")
    return words[raw.strip().lower()]


def _parse_relations(raw: str) -> int | tuple[str, ...]:
    raw = raw.strip()
    return int(raw) if raw.isdigit() else tuple(k.strip() for k in raw.split("+") if k.strip())


# WorldSpec.parse key -> (field, reader of the value text).
_SPEC_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "pool": ("entity_pool", int),
    "relations": ("relations", _parse_relations),
    "fixed_names": ("fixed_tool_names", _parse_bool),
    "seed": ("seed", int),
}
_FULL_WORLD_WORDS = ("", "full", "default")


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """Size knobs of a world; the defaults are the full world, exactly as without a spec.

    entity_pool: names per entity type, fixed once from a seeded pool so that they recur across
        environments (None: a freshly invented name every time).
    relations: how many relations are used (a seeded subset in which multi-hop chains exist,
        see `choose_relations`), or the relation keys themselves (None: all of them).
    fixed_tool_names: one canonical tool name, selector and description wording per relation
        instead of random stems, so one relation always gives the same tool document.
    seed: seeds the pool and the subset, not the facts, so worlds with different fact seeds
        (training and held-out builds) share their names and relations.
    """

    entity_pool: int | None = None
    relations: int | tuple[str, ...] | None = None
    fixed_tool_names: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        pool = self.entity_pool
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 2):
            raise ValueError(f"WorldSpec.entity_pool must be an integer >= 2 (names per entity type) or None, "
                             f"got {pool!r}")
        relations = self.relations
        if isinstance(relations, (list, tuple)):
            relations = tuple(relations)
            unknown = [k for k in relations if k not in RELATIONS]
            if unknown or not relations or len(set(relations)) != len(relations):
                raise ValueError(f"WorldSpec.relations: unknown, repeated or no relation keys in {list(relations)} "
                                 f"(unknown: {unknown}); use keys of world.RELATIONS such as 'capital'")
            object.__setattr__(self, "relations", relations)
        elif relations is not None and (isinstance(relations, bool) or not isinstance(relations, int)
                                        or not 1 <= relations <= len(RELATIONS)):
            raise ValueError(f"WorldSpec.relations must be a count in 1..{len(RELATIONS)}, a sequence of "
                             f"relation keys, or None; got {relations!r}")
        if not isinstance(self.fixed_tool_names, bool):
            raise ValueError(f"WorldSpec.fixed_tool_names must be True or False, got {self.fixed_tool_names!r}")

    @classmethod
    def parse(cls, text: str) -> "WorldSpec":
        """'' | 'full' | 'pool=40,relations=12,fixed_names=1,seed=0'.

        relations= takes a count or relation keys joined by '+': 'relations=capital+birth_city'.
        """
        if text.strip().lower() in _FULL_WORLD_WORDS:
            return cls()
        values: dict[str, Any] = {}
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            key, equals, raw = part.partition("=")
            if not equals or key.strip() not in _SPEC_KEYS:
                raise ValueError(f"cannot read world spec part {part!r} in {text!r}; use key=value with keys "
                                 f"{sorted(_SPEC_KEYS)}, or 'full'")
            field, read = _SPEC_KEYS[key.strip()]
            try:
                values[field] = read(raw)
            except ValueError as exc:
                raise ValueError(f"world spec {key.strip()}={raw!r} in {text!r}: {exc}") from None
        return cls(**values)

    @classmethod
    def coerce(cls, value: "WorldSpec | str | None") -> "WorldSpec":
        """A spec from a spec, its text form, or None (the full world)."""
        if value is None:
            return cls()
        return value if isinstance(value, WorldSpec) else cls.parse(value)

    def __str__(self) -> str:
        """The text form read by `parse` ('full' for the defaults)."""
        parts = []
        if self.entity_pool is not None:
            parts.append(f"pool={self.entity_pool}")
        if isinstance(self.relations, tuple):
            parts.append("relations=" + "+".join(self.relations))
        elif self.relations is not None:
            parts.append(f"relations={self.relations}")
        if self.fixed_tool_names:
            parts.append("fixed_names=1")
        if self.seed and (self.entity_pool is not None or isinstance(self.relations, int)):
            parts.append(f"seed={self.seed}")
        return ",".join(parts) or "full"


def choose_relations(count: int, seed: int = 0) -> tuple[str, ...]:
    """A seeded subset of `count` relation keys (in schema order) in which multi-hop chains exist.

    Chain-friendly relations come first: a spine of up to four chaining relations through
    distinct types (chains of up to five hops), then a value relation for each spine type,
    the spine's end first (so chains can end in an attribute), then relations about types
    already in play, so the subset stays connected.
    """
    if not 1 <= count <= len(_RELATIONS):
        raise ValueError(f"relation count must be in 1..{len(_RELATIONS)}, got {count}")
    rng = random.Random(f"world-relations|{seed}|{count}")
    spine = _spine(rng, min(count // 2, 4))
    chosen: dict[str, Relation] = {r.key: r for r in spine}
    if spine:
        spine_types = [spine[0].subject] + [r.target for r in spine]
    else:
        with_values = [t for t, rels in RELATIONS_BY_SUBJECT.items() if any(not r.chains for r in rels)]
        spine_types = [rng.choice(with_values)]
    for type_key in reversed(spine_types):
        values = [r for r in RELATIONS_BY_SUBJECT[type_key] if not r.chains]
        if len(chosen) < count and values:
            relation = rng.choice(values)
            chosen[relation.key] = relation
    while len(chosen) < count:
        in_play = {r.subject for r in chosen.values()} | {r.target for r in chosen.values() if r.chains}
        spare = [r for r in _RELATIONS if r.key not in chosen]
        relation = rng.choice([r for r in spare if r.subject in in_play] or spare)
        chosen[relation.key] = relation
    return tuple(r.key for r in _RELATIONS if r.key in chosen)


def _spine(rng: random.Random, length: int) -> list[Relation]:
    """A path of `length` chaining relations through distinct entity types."""
    if length == 0:
        return []
    chaining = [r for r in _RELATIONS if r.chains]
    for _ in range(256):
        path = [rng.choice(chaining)]
        seen = {path[0].subject, path[0].target}
        while len(path) < length:
            options = [r for r in RELATIONS_BY_SUBJECT[path[-1].target] if r.chains and r.target not in seen]
            if not options:
                break
            path.append(rng.choice(options))
            seen.add(path[-1].target)
        if len(path) == length:
            return path
    raise ValueError(f"the schema has no path of {length} chaining relations; ask for fewer")


@functools.lru_cache(maxsize=8)
def entity_pools(size: int, seed: int = 0) -> Mapping[str, tuple[str, ...]]:
    """`size` names per entity type, seeded (each type from its own stream); read-only and cached,
    as training and held-out builds share them.

    No name equals, contains or is contained in a name of any type already drawn (letter case
    ignored), so an answer never matches inside another name and no name hides in a question.
    """
    taken: list[str] = []
    pools: dict[str, tuple[str, ...]] = {}
    for entity in _ENTITY_TYPES:
        rng = random.Random(f"world-pool|{seed}|{entity.key}")
        names: list[str] = []
        for _ in range(200 * size):
            if len(names) == size:
                break
            name = entity.make_name(rng)
            lowered = name.lower()
            if not any(lowered in other or other in lowered for other in taken):
                taken.append(lowered)
                names.append(name)
        if len(names) < size:
            raise ValueError(f"entity type {entity.key!r} cannot supply {size} distinct names; "
                             "use a smaller entity pool")
        pools[entity.key] = tuple(names)
    return types.MappingProxyType(pools)


# --- the world -------------------------------------------------------------------------

def _reach(relations_by_subject: dict[str, tuple[Relation, ...]], start: str, seen: frozenset[str]) -> int:
    """Hops of the longest chain from `start` through types not in `seen`.

    An exhaustive search, cheap at this size (the full world's 22 types take ~20 ms).
    """
    best = 0
    for relation in relations_by_subject[start]:
        if not relation.chains:
            best = max(best, 1)
        elif relation.target not in seen:
            best = max(best, 1 + _reach(relations_by_subject, relation.target, seen | {relation.target}))
    return best


class World:
    """Facts as a pure function of (seed, relation, subject); entities invented on demand.

    `spec` sizes the world (see WorldSpec); the default is the full world.
    """

    def __init__(self, seed: int = 0, spec: WorldSpec | str | None = None):
        self.seed = seed
        self.spec = WorldSpec.coerce(spec)
        keys = self.spec.relations
        if isinstance(keys, int):
            keys = choose_relations(keys, self.spec.seed)
        active = set(keys) if keys is not None else None
        # The full world keeps the module tables themselves, so its draws are as they always were.
        self.relations: dict[str, Relation] = RELATIONS if active is None else {
            r.key: r for r in _RELATIONS if r.key in active}
        self.relations_by_subject: dict[str, tuple[Relation, ...]] = RELATIONS_BY_SUBJECT if active is None else {
            t: tuple(r for r in self.relations.values() if r.subject == t) for t in ENTITY_TYPES}
        self.pools = entity_pools(self.spec.entity_pool, self.spec.seed) if self.spec.entity_pool else None
        self._reach_by_type: dict[str, int] | None = None

    def entity(self, type_key: str, rng: random.Random) -> str:
        """A name of the given entity type drawn from `rng`: invented, or from the type's pool."""
        if self.pools is None:
            return ENTITY_TYPES[type_key].make_name(rng)
        pool = self.pools[type_key]
        return pool[int(rng.random() * len(pool))]

    def fact(self, relation_key: str, subject: str) -> str:
        """The object of `relation_key` for `subject` (same inputs, same answer, always)."""
        relation = RELATIONS[relation_key]
        # str seeds are hashed with SHA-512 by `random`, so this is stable across processes.
        rng = random.Random(f"{self.seed}|{relation_key}|{subject}")
        if relation.chains:
            return self.entity(relation.target, rng)
        return VALUE_KINDS[relation.target](rng)

    def follow(self, subject: str, relations: Iterable[str]) -> list[str]:
        """The answers met when following `relations` from `subject`, one per hop."""
        answers = []
        for key in relations:
            subject = self.fact(key, subject)
            answers.append(subject)
        return answers

    def reach(self) -> dict[str, int]:
        """Entity type -> hops of the longest chain that can start there."""
        if self._reach_by_type is None:
            self._reach_by_type = {t: _reach(self.relations_by_subject, t, frozenset({t})) for t in ENTITY_TYPES}
        return self._reach_by_type

    def longest_chain(self) -> int:
        """Hops of the longest chain this world's relations allow."""
        return max(self.reach().values())

    def sample_chain(self, rng: random.Random, hops: int, avoid_types: Iterable[str] = ()) -> list[Relation]:
        """A random chain of `hops` relations of this world (see the module's `sample_chain`)."""
        if self.relations is RELATIONS:
            return sample_chain(rng, hops, avoid_types)
        if hops > self.longest_chain():
            raise ValueError(f"world spec {self.spec} allows chains of at most {self.longest_chain()} hops, "
                             f"not {hops}; use more relations or fewer hops (complexity hops=)")
        # Only types that can start a long enough chain, so a small world does not run out of tries.
        starts = [t for t, reach in self.reach().items() if reach >= hops]
        return _walk_chain(rng, hops, avoid_types, self.relations_by_subject, starts)


def sample_chain(rng: random.Random, hops: int, avoid_types: Iterable[str] = ()) -> list[Relation]:
    """A random path of `hops` relations through distinct entity types.

    Only the last hop may end in a value; types never repeat, so a chain cannot loop back
    (capital of the country of a city). Raises ValueError if no such path exists.
    """
    return _walk_chain(rng, hops, avoid_types, RELATIONS_BY_SUBJECT, list(ENTITY_TYPES))


def _walk_chain(rng: random.Random, hops: int, avoid_types: Iterable[str],
                relations_by_subject: dict[str, tuple[Relation, ...]], types: list[str]) -> list[Relation]:
    if hops < 1:
        raise ValueError(f"hops must be at least 1, got {hops}")
    avoid = set(avoid_types)
    starts = [t for t in types if t not in avoid]
    for _ in range(64):
        chain: list[Relation] = []
        current = rng.choice(starts)
        seen = {current} | avoid
        for hop in range(hops):
            last = hop == hops - 1
            options = [r for r in relations_by_subject[current]
                       if (not r.chains and last) or (r.chains and r.target not in seen)]
            if not last:
                options = [r for r in options if r.chains]
            if not options:
                break
            rel = rng.choice(options)
            chain.append(rel)
            if rel.chains:
                current = rel.target
                seen.add(current)
        if len(chain) == hops:
            return chain
    raise ValueError(f"no chain of {hops} hops avoiding types {sorted(avoid)}; ask for fewer hops")
