"""The regulated domains the rulebook generator writes about, as data.

A domain names what a case is (its kinds), the numbers a rule can test (quantities), the yes/no
facts it can test (flags) and three outcome words, one per outcome class, with the clauses a rule
uses to state them. ``{who}`` stands for the person concerned: "the applicant" in a rule, the
person's name in a case. Each domain belongs to exactly one split (``DOMAIN_SPLITS``): the test
split's domains, and every word written for them, never reach training.
"""
from __future__ import annotations

from dataclasses import dataclass

# Outcome classes, in the order a domain lists its outcome words.
CLASSES = ("favourable", "escalated", "adverse")


@dataclass(frozen=True)
class Quantity:
    """A number a rule compares with a threshold: ``noun`` is what it is ("the loan amount")."""

    key: str
    noun: str
    kind: str  # money | age | duration | count | percent | measure | score
    unit: str  # currency, time or measurement unit; "" for bare numbers
    low: int
    high: int
    step: int  # thresholds are multiples of step; case values multiples of step // 10


@dataclass(frozen=True)
class Flag:
    """A yes/no fact, with the clause that states it and the clause that denies it."""

    key: str
    yes: str
    no: str


@dataclass(frozen=True)
class Domain:
    key: str
    title: str
    prefix: str  # rule labels such as "KYC-4"
    subject: str  # the role ``{who}`` takes in rules ("applicant")
    intro: str  # the case's first sentence, with {who} and {kind}
    kinds: tuple[tuple[str, str], ...]  # (a case of this kind, the rules' name for all such cases)
    everything: str  # a rule's scope when it covers every kind
    quantities: tuple[Quantity, ...]
    flags: tuple[Flag, ...]
    outcomes: tuple[str, str, str]  # one word per class in CLASSES order
    clauses: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]  # how rules state each outcome


Q, F = Quantity, Flag

DOMAINS: dict[str, Domain] = {d.key: d for d in [
    Domain(
        "lending", "Consumer lending policy", "LEND", "applicant", "{who} applies for {kind}.",
        (("a personal loan", "personal loans"), ("a car loan", "car loans"), ("a mortgage", "mortgages"),
         ("a credit card", "credit card applications"), ("an overdraft", "overdrafts")),
        "all loan applications",
        (Q("amount", "the amount requested", "money", "EUR", 1000, 150000, 1000),
         Q("age", "{who}", "age", "", 18, 85, 1),
         Q("score", "{who}'s credit score", "score", "", 300, 850, 10),
         Q("dti", "{who}'s debt-to-income ratio", "percent", "", 5, 70, 5),
         Q("job", "the time {who} has spent in the current job", "duration", "months", 2, 120, 3)),
        (F("guarantor", "{who} has a guarantor", "{who} has no guarantor"),
         F("customer", "{who} is an existing customer of the bank", "{who} is not an existing customer of the bank"),
         F("default", "{who} has a recorded payment default", "{who} has no recorded payment default")),
        ("approve", "refer", "decline"),
        (("the application is approved", "approve the application"),
         ("the application is referred to the credit committee", "refer the application to a senior underwriter"),
         ("the application is declined", "decline the application")),
    ),
    Domain(
        "kyc", "Anti-money-laundering and customer due diligence rules", "KYC", "customer",
        "{who} wants to make {kind}.",
        (("a cash deposit", "cash deposits"), ("a wire transfer", "wire transfers"),
         ("a crypto purchase", "crypto purchases"), ("a cash withdrawal", "cash withdrawals"),
         ("a currency exchange", "currency exchanges")),
        "all transactions",
        (Q("amount", "the transaction amount", "money", "EUR", 500, 200000, 500),
         Q("age", "{who}", "age", "", 16, 90, 1),
         Q("count", "the number of transactions {who} made this month", "count", "", 1, 60, 1),
         Q("tenure", "the time since {who} opened the account", "duration", "days", 2, 720, 30),
         Q("risk", "{who}'s risk rating", "score", "", 1, 100, 5)),
        (F("pep", "{who} is a politically exposed person", "{who} is not a politically exposed person"),
         F("id", "{who} has presented a valid identity document",
           "{who} has not presented a valid identity document"),
         F("country", "the funds come from a high-risk country", "the funds do not come from a high-risk country")),
        ("clear", "escalate", "block"),
        (("the transaction is cleared", "clear the transaction"),
         ("the transaction is escalated to the compliance officer",
          "escalate the case to the money-laundering reporting officer"),
         ("the transaction is blocked", "block the transaction")),
    ),
    Domain(
        "claims", "Household and travel insurance claims handbook", "CLM", "policyholder", "{who} submits {kind}.",
        (("a water damage claim", "water damage claims"), ("a theft claim", "theft claims"),
         ("a fire damage claim", "fire damage claims"), ("a lost luggage claim", "lost luggage claims"),
         ("a storm damage claim", "storm damage claims")),
        "all claims",
        (Q("amount", "the amount claimed", "money", "EUR", 100, 100000, 500),
         Q("delay", "the delay between the loss and the report", "duration", "days", 2, 365, 5),
         Q("previous", "the number of claims {who} made in the last three years", "count", "", 0, 10, 1),
         Q("policy", "the time the policy has been in force", "duration", "months", 2, 120, 3)),
        (F("police", "{who} has filed a police report", "{who} has not filed a police report"),
         F("receipts", "{who} can show receipts for the items", "{who} cannot show receipts for the items"),
         F("arrears", "{who} is behind on premium payments", "{who} is up to date with premium payments")),
        ("pay", "investigate", "deny"),
        (("the claim is paid", "pay the claim"),
         ("the claim is passed to the fraud investigation team", "investigate the claim before any payment"),
         ("the claim is denied", "deny the claim")),
    ),
    Domain(
        "dosing", "Medication dispensing protocol", "MED", "patient", "{who} brings {kind} to the pharmacy.",
        (("an ibuprofen prescription", "ibuprofen prescriptions"),
         ("a paracetamol prescription", "paracetamol prescriptions"),
         ("an amoxicillin prescription", "amoxicillin prescriptions"),
         ("a warfarin prescription", "warfarin prescriptions"), ("a codeine prescription", "codeine prescriptions")),
        "all prescriptions",
        (Q("dose", "the prescribed daily dose", "measure", "mg", 100, 4000, 100),
         Q("age", "{who}", "age", "", 2, 95, 1),
         Q("weight", "{who}'s body weight", "measure", "kg", 5, 150, 5),
         Q("course", "the planned length of treatment", "duration", "days", 2, 90, 7),
         Q("others", "the number of other medicines {who} takes", "count", "", 0, 12, 1)),
        (F("pregnant", "{who} is pregnant", "{who} is not pregnant"),
         F("kidney", "{who} has impaired kidney function", "{who} has normal kidney function"),
         F("allergy", "{who} has a documented allergy to the drug class",
           "{who} has no documented allergy to the drug class")),
        ("dispense", "consult", "withhold"),
        (("the medicine is dispensed", "dispense the medicine"),
         ("the pharmacist consults the prescriber first", "consult the prescribing doctor before dispensing"),
         ("the medicine is withheld", "withhold the medicine")),
    ),
    Domain(
        "leave", "Staff leave and working-time policy", "HR", "employee", "{who} requests {kind}.",
        (("a period of annual leave", "annual leave requests"), ("a period of unpaid leave", "unpaid leave requests"),
         ("a sabbatical", "sabbatical requests"), ("a stint of remote work abroad", "requests for remote work abroad"),
         ("a move to part-time hours", "part-time requests")),
        "all requests",
        (Q("length", "the length of the requested absence", "duration", "days", 2, 365, 5),
         Q("service", "{who}'s length of service", "duration", "months", 2, 240, 6),
         Q("notice", "the notice given", "duration", "days", 2, 120, 7),
         Q("absent", "the number of colleagues in {who}'s team already absent", "count", "", 0, 10, 1)),
        (F("probation", "{who} is still in the probation period", "{who} has completed the probation period"),
         F("manager", "{who}'s line manager has endorsed the request",
           "{who}'s line manager has not endorsed the request"),
         F("closing", "the absence falls in the year-end closing period",
           "the absence falls outside the year-end closing period")),
        ("grant", "review", "refuse"),
        (("the request is granted", "grant the request"),
         ("the request goes to HR for review", "pass the request to the HR business partner for review"),
         ("the request is refused", "refuse the request")),
    ),
    Domain(
        "privacy", "Personal data handling standard", "DP", "requester", "{who} proposes {kind}.",
        (("a transfer of customer data to a vendor", "data transfers to vendors"),
         ("an export of employee records", "exports of employee records"),
         ("a marketing mailing to existing customers", "marketing mailings"),
         ("a research use of patient data", "research uses of health data"),
         ("a data sharing agreement with a partner", "partner data sharing")),
        "all processing of personal data",
        (Q("records", "the number of records involved", "count", "", 100, 500000, 1000),
         Q("retention", "the planned retention period", "duration", "months", 2, 120, 6),
         Q("youngest", "the youngest person in the data set", "age", "", 2, 60, 1),
         Q("fields", "the number of personal fields per record", "count", "", 2, 60, 2)),
        (F("consent", "the data subjects have given explicit consent",
           "the data subjects have not given explicit consent"),
         F("special", "the data include health or biometric information",
           "the data include no health or biometric information"),
         F("abroad", "the recipient is located outside the European Economic Area",
           "the recipient is located inside the European Economic Area")),
        ("allow", "escalate", "forbid"),
        (("the processing is allowed", "allow the processing"),
         ("the proposal is escalated to the data protection officer",
          "escalate the proposal to the data protection officer"),
         ("the processing is forbidden", "forbid the processing")),
    ),
    Domain(
        "expenses", "Travel and expenses policy", "TE", "employee", "{who} submits {kind}.",
        (("a hotel expense claim", "hotel claims"), ("a flight booking", "flight bookings"),
         ("a client dinner receipt", "client entertainment claims"), ("a taxi fare claim", "taxi claims"),
         ("a conference fee", "conference fees")),
        "all expense claims",
        (Q("amount", "the amount claimed", "money", "EUR", 10, 10000, 50),
         Q("lag", "the time between the expense and the claim", "duration", "days", 2, 365, 15),
         Q("guests", "the number of guests", "count", "", 1, 30, 1),
         Q("flight", "the flight time", "duration", "hours", 2, 20, 1)),
        (F("receipt", "{who} has attached an itemised receipt", "{who} has not attached an itemised receipt"),
         F("preapproved", "the trip was approved in advance", "the trip was not approved in advance"),
         F("alcohol", "the bill includes alcohol", "the bill does not include alcohol")),
        ("reimburse", "query", "reject"),
        (("the claim is reimbursed", "reimburse the employee"),
         ("the claim is returned to the employee with questions", "query the claim with the employee"),
         ("the claim is rejected", "reject the claim")),
    ),
    Domain(
        "access", "Information security access policy", "SEC", "user", "{who} requests {kind}.",
        (("administrator rights on a server", "administrator access requests"),
         ("remote access through the VPN", "VPN access requests"),
         ("access to the production database", "production database requests"),
         ("a new cloud storage account", "cloud storage requests"),
         ("installation of unlisted software", "software installation requests")),
        "all access requests",
        (Q("period", "the requested access period", "duration", "days", 2, 365, 10),
         Q("training", "the time since {who} last completed security training", "duration", "months", 2, 48, 3),
         Q("failed", "the number of failed logins on {who}'s account this week", "count", "", 0, 50, 1),
         Q("systems", "the number of systems covered by the request", "count", "", 1, 40, 1)),
        (F("contractor", "{who} is an external contractor", "{who} is a permanent employee"),
         F("mfa", "{who} has multi-factor authentication enabled",
           "{who} does not have multi-factor authentication enabled"),
         F("device", "the request comes from a managed company device", "the request comes from a personal device")),
        ("grant", "review", "deny"),
        (("access is granted", "grant the access"),
         ("the request is sent to the security team for review", "have the security team review the request"),
         ("access is denied", "deny the request")),
    ),
    Domain(
        "procurement", "Purchasing and supplier policy", "PUR", "buyer", "{who} raises {kind}.",
        (("a purchase order for office equipment", "office equipment orders"),
         ("a consulting contract", "consulting contracts"), ("a software licence order", "software licence orders"),
         ("a purchase of laboratory supplies", "laboratory supply purchases")),
        "all purchases",
        (Q("value", "the order value", "money", "EUR", 500, 500000, 500),
         Q("quotes", "the number of competing quotes obtained", "count", "", 0, 6, 1),
         Q("term", "the contract term", "duration", "months", 2, 60, 6),
         Q("risk", "the supplier's risk score", "score", "", 0, 100, 5)),
        (F("listed", "the supplier is on the approved supplier list", "the supplier is not on the approved supplier list"),
         F("budget", "the cost is covered by an approved budget", "the cost is not covered by an approved budget"),
         F("conflict", "{who} has declared a conflict of interest", "{who} has declared no conflict of interest")),
        ("approve", "escalate", "reject"),
        (("the order is approved", "approve the order"),
         ("the order is escalated to the procurement board", "escalate the order to the head of purchasing"),
         ("the order is rejected", "reject the order")),
    ),
    Domain(
        "tenancy", "Residential letting criteria", "LET", "applicant", "{who} applies to rent {kind}.",
        (("a one-bedroom flat", "one-bedroom flats"), ("a family house", "family houses"),
         ("a student room", "student rooms"), ("a furnished studio", "furnished studios")),
        "all lettings",
        (Q("share", "the rent as a share of {who}'s income", "percent", "", 10, 80, 5),
         Q("deposit", "the deposit offered", "money", "EUR", 100, 10000, 100),
         Q("age", "{who}", "age", "", 16, 90, 1),
         Q("occupants", "the number of occupants", "count", "", 1, 8, 1)),
        (F("references", "{who} has references from a previous landlord",
           "{who} has no references from a previous landlord"),
         F("pets", "{who} keeps pets", "{who} keeps no pets"),
         F("arrears", "{who} has rent arrears on record", "{who} has no rent arrears on record")),
        ("accept", "refer", "reject"),
        (("the application is accepted", "accept the tenant"),
         ("the application is referred to the letting manager", "refer the file to the letting manager"),
         ("the application is rejected", "reject the applicant")),
    ),
    Domain(
        "customs", "Customs clearance instructions", "CUS", "declarant", "{who} declares {kind} at the border.",
        (("a shipment of electronics", "electronics shipments"), ("a consignment of cut flowers", "flower consignments"),
         ("a parcel of medicines", "medicine parcels"), ("a crate of wine", "wine imports"),
         ("a used vehicle", "used vehicle imports")),
        "every import",
        (Q("value", "the declared value", "money", "EUR", 50, 200000, 500),
         Q("weight", "the gross weight of the goods", "measure", "kg", 2, 20000, 50),
         Q("transit", "the time the goods spent in transit", "duration", "days", 2, 90, 5),
         Q("offences", "the number of earlier customs offences by {who}", "count", "", 0, 6, 1)),
        (F("invoice", "{who} provides a commercial invoice", "{who} provides no commercial invoice"),
         F("origin", "the goods carry a certificate of origin", "the goods carry no certificate of origin"),
         F("port", "the goods were shipped through a sanctioned port",
           "the goods were not shipped through a sanctioned port")),
        ("release", "inspect", "seize"),
        (("the goods are released", "release the goods"),
         ("the goods are held for physical inspection", "inspect the consignment before release"),
         ("the goods are seized", "seize the goods")),
    ),
    Domain(
        "trials", "Clinical study enrolment criteria", "CT", "volunteer", "{who} is screened for {kind}.",
        (("the asthma study", "asthma study candidates"), ("the diabetes study", "diabetes study candidates"),
         ("the vaccine study", "vaccine study candidates"), ("the sleep study", "sleep study candidates")),
        "every candidate",
        (Q("age", "{who}", "age", "", 12, 90, 1),
         Q("bmi", "{who}'s body mass index", "score", "", 15, 45, 1),
         Q("pressure", "the systolic blood pressure", "measure", "mmHg", 90, 200, 5),
         Q("gap", "the time since {who}'s last study participation", "duration", "months", 2, 60, 3)),
        (F("pregnant", "{who} is pregnant", "{who} is not pregnant"),
         F("consent", "{who} has signed the consent form", "{who} has not signed the consent form"),
         F("smoker", "{who} smokes", "{who} does not smoke")),
        ("enrol", "refer", "exclude"),
        (("the volunteer is enrolled", "enrol the volunteer"),
         ("the file goes to the study physician", "refer the volunteer to the study physician"),
         ("the volunteer is excluded", "exclude the volunteer")),
    ),
    Domain(
        "permits", "Municipal building permit rules", "BLD", "owner", "{who} applies to build {kind}.",
        (("a garden shed", "garden sheds"), ("a rear extension", "rear extensions"),
         ("a roof terrace", "roof terraces"), ("a detached garage", "detached garages")),
        "every building project",
        (Q("height", "the planned height", "measure", "metres", 2, 20, 1),
         Q("area", "the floor area", "measure", "square metres", 5, 300, 5),
         Q("distance", "the distance to the property boundary", "measure", "metres", 2, 30, 1),
         Q("age", "the age of the existing building", "duration", "years", 2, 200, 10)),
        (F("heritage", "the building is listed as a heritage site", "the building is not listed as a heritage site"),
         F("objection", "the neighbours have objected in writing", "the neighbours have not objected"),
         F("flood", "the plot lies in a flood zone", "the plot lies outside any flood zone")),
        ("approve", "review", "refuse"),
        (("the permit is approved", "approve the permit"),
         ("the application goes to the planning committee for review", "review the plans in committee"),
         ("the permit is refused", "refuse the permit")),
    ),
    Domain(
        "food", "Food premises inspection guide", "FS", "operator", "{who} runs {kind} that is due for inspection.",
        (("a restaurant", "restaurants"), ("a food truck", "food trucks"), ("a bakery", "bakeries"),
         ("a school canteen", "school canteens")),
        "all food premises",
        (Q("fridge", "the cold storage temperature", "measure", "degrees Celsius", 0, 15, 1),
         Q("since", "the time since the last inspection", "duration", "months", 2, 48, 3),
         Q("pests", "the number of pest sightings reported", "count", "", 0, 10, 1),
         Q("hygiene", "the hygiene score at the last visit", "score", "", 0, 100, 5)),
        (F("certified", "the staff hold food hygiene certificates", "the staff hold no food hygiene certificates"),
         F("water", "hot running water is available", "hot running water is not available"),
         F("allergens", "allergen information is displayed", "allergen information is not displayed")),
        ("pass", "reinspect", "close"),
        (("the premises pass", "pass the premises"),
         ("a follow-up inspection is scheduled", "schedule a reinspection"),
         ("the premises are closed until further notice", "close the premises")),
    ),
]}

# Which split each domain's rulebooks belong to: validation and test domains are never trained on.
DOMAIN_SPLITS = {
    "train": ("lending", "kyc", "claims", "dosing", "leave", "privacy", "expenses", "access", "procurement"),
    "validation": ("tenancy",),
    "test": ("customs", "trials", "permits", "food"),
}
